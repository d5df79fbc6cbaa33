"""Reading a CUHK-SYSU layout (docs/data.md) into a `ParsedDataset`.

Training images are all images minus the pool; a box of Images.mat is a
labelled identity when Train.mat or a TestG file names the same image and
exactly the same `[x y w h]`; every other box is an unlabelled background
person; boxes with w <= 0 or h <= 0 are dropped and counted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from psearch.data import matfast
from psearch.data import matfiles as mf
from psearch.data.records import (
    Gallery,
    ParsedDataset,
    low_resolution_mask,
    plain_file_name,
)
from psearch.errors import PsearchError

IMAGE_DIR = "Image/SSM"
PROTOCOL_RE = re.compile(r"^TestG(\d+)\.mat$")
SUBSETS = {
    "occlusion": ("Occlusion.mat", "Occlusion1"),
    "low_resolution": ("Resolution.mat", "Test_Size"),
}

Box = tuple[float, float, float, float]


class _BoxIndex:
    """(image name, exact box) -> box index, for matching protocol entries to Images.mat."""

    def __init__(self) -> None:
        self.lookup: dict[tuple[str, Box], int] = {}

    def add(self, image: str, box: Box, index: int) -> None:
        self.lookup.setdefault((image, box), index)

    def find(self, image: str, box: Box, where: str) -> int:
        index = self.lookup.get((image, box))
        if index is None:
            shown = "[" + " ".join(f"{v:g}" for v in box) + "]"
            raise PsearchError(
                f"{where}: box {shown} in {image} matches no annotated box of Images.mat"
            )
        return index


def read_cuhk_sysu(root: Path) -> ParsedDataset:
    ann = root / "annotation"
    if not ann.is_dir():
        raise PsearchError(f"{ann}: annotation directory not found (is {root} a CUHK-SYSU root?)")
    images_mat = ann / "Images.mat"
    names, boxes, hard, box_image, dropped, index = _read_images(images_mat)
    pool_mat = ann / "pool.mat"
    pool = mf.strings(mf.load_variable(pool_mat, "pool")[1], str(pool_mat))
    image_of = {name: i for i, name in enumerate(names)}
    for name in pool:
        if name not in image_of:
            raise PsearchError(f"{pool_mat}: test image {name} is not in {images_mat}")
    test_set = set(pool)
    splits = ["test" if n in test_set else "train" for n in names]

    person = np.full(len(boxes), -1, dtype=np.int32)
    person_names: list[str] = []
    person_splits: list[str] = []
    train_mat = ann / "test" / "train_test" / "Train.mat"
    for name, scenes in _read_train(train_mat):
        pid = len(person_names)
        person_names.append(name)
        person_splits.append("train")
        for k, (imname, box) in enumerate(scenes):
            person[index.find(imname, box, f"{train_mat} (identity {name}, scene {k + 1})")] = pid

    protocols = _protocol_files(ann / "test" / "train_test")
    queries, galleries = _read_protocols(protocols, image_of, index)
    test_person: dict[str, int] = {}
    query_person = np.empty(len(queries), dtype=np.int32)
    for qi, (imname, box, idname) in enumerate(queries):
        if idname not in test_person:
            test_person[idname] = len(person_names)
            person_names.append(idname)
            person_splits.append("test")
        query_person[qi] = test_person[idname]
        person[index.find(imname, box, f"{protocols[0][1]} (query {qi + 1})")] = query_person[qi]
    for g, (size, path) in zip(galleries, protocols, strict=True):
        _label_gallery_boxes(g, path, size, names, query_person, index, person)

    query_image = np.array([image_of[q[0]] for q in queries], dtype=np.int32)
    query_xywh = np.array([q[1] for q in queries], dtype=np.float64).reshape(-1, 4)
    subsets, occluded, low_res, subset_files = _read_subsets(
        ann / "test" / "subset", queries, query_xywh
    )
    used = [images_mat, pool_mat, train_mat, *[p for _, p in protocols], *subset_files]
    return ParsedDataset(
        name="CUHK-SYSU",
        format="cuhk-sysu",
        image_names=names,
        image_paths=[f"{IMAGE_DIR}/{n}" for n in names],
        image_splits=splits,
        box_image=box_image,
        box_xywh=boxes,
        box_person=person,
        box_hard=hard,
        person_names=person_names,
        person_splits=person_splits,
        query_person=query_person,
        query_image=query_image,
        query_xywh=query_xywh,
        query_occluded=occluded,
        query_low_resolution=low_res,
        galleries=galleries,
        annotation_files=used,
        info={"dropped_zero_size_boxes": dropped, "subsets": subsets},
    )


def _read_images(path: Path):
    """Image names, kept boxes (n x 4), hard flags, box -> image, zero-size count, box index."""
    _, img = mf.load_variable(path, "Img")
    names: list[str] = []
    seen: set[str] = set()
    boxes: list[Box] = []
    hard: list[bool] = []
    box_image: list[int] = []
    dropped = 0
    index = _BoxIndex()
    for i, rec in enumerate(mf.struct_elements(img, f"{path}: Img")):
        where = f"{path}: Img({i + 1})"
        name = mf.text(mf.field(rec, "imname", where), f"{where}.imname")
        plain_file_name(name, f"{where}.imname")
        if name in seen:
            raise PsearchError(f"{path}: duplicate image name {name}")
        seen.add(name)
        names.append(name)
        for k, b in enumerate(mf.struct_elements(mf.field(rec, "box", where), f"{where}.box")):
            bwhere = f"{where}.box({k + 1})"
            xywh = mf.box(mf.field(b, "idlocate", bwhere), f"{bwhere}.idlocate")
            if xywh is None or xywh[2] <= 0 or xywh[3] <= 0:
                dropped += 1
                continue
            index.add(name, xywh, len(boxes))
            boxes.append(xywh)
            ishard = mf.optional_field(b, "ishard")
            hard.append(mf.flag(ishard, f"{bwhere}.ishard") if ishard is not None else False)
            box_image.append(len(names) - 1)
    return (
        names,
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.array(hard, dtype=bool),
        np.array(box_image, dtype=np.int32),
        dropped,
        index,
    )


def _read_train(path: Path) -> list[tuple[str, list[tuple[str, Box]]]]:
    _, train = mf.load_variable(path, "Train")
    out = []
    for i, rec in enumerate(mf.struct_elements(train, f"{path}: Train")):
        where = f"{path}: Train({i + 1})"
        name = mf.text(mf.field(rec, "idname", where), f"{where}.idname")
        scenes = []
        for k, s in enumerate(mf.struct_elements(mf.field(rec, "scene", where), f"{where}.scene")):
            swhere = f"{where}.scene({k + 1})"
            imname = mf.text(mf.field(s, "imname", swhere), f"{swhere}.imname")
            box = mf.box(mf.field(s, "idlocate", swhere), f"{swhere}.idlocate")
            if box is None:
                raise PsearchError(f"{swhere}: empty idlocate for identity {name}")
            scenes.append((imname, box))
        out.append((name, scenes))
    return out


def _protocol_files(directory: Path) -> list[tuple[int, Path]]:
    found = (
        sorted(
            (int(m.group(1)), p)
            for p in directory.glob("TestG*.mat")
            if (m := PROTOCOL_RE.match(p.name))
        )
        if directory.is_dir()
        else []
    )
    if not found:
        raise PsearchError(f"{directory}: no TestG<size>.mat protocol files found")
    return found


def _read_query(rec: np.void, where: str) -> tuple[str, Box, str]:
    q = mf.struct_elements(mf.field(rec, "Query", where), f"{where}.Query")
    if len(q) != 1:
        raise PsearchError(f"{where}.Query: expected one query, got {len(q)}")
    imname = mf.text(mf.field(q[0], "imname", f"{where}.Query"), f"{where}.Query.imname")
    box = mf.box(mf.field(q[0], "idlocate", f"{where}.Query"), f"{where}.Query.idlocate")
    if box is None:
        raise PsearchError(f"{where}.Query.idlocate: empty query box")
    idname = mf.optional_field(q[0], "idname")
    return imname, box, (mf.text(idname, f"{where}.Query.idname") if idname is not None else "")


def _read_protocols(protocols, image_of, index):
    """Queries (from the first file; the others must agree) and one Gallery per file."""
    reference: list[tuple[str, Box, str]] | None = None
    galleries = []
    for size, path in protocols:
        queries, gallery = read_protocol(path, path.stem, size, image_of)
        for qi, (imname, _, _) in enumerate(queries):
            if imname not in image_of:
                raise PsearchError(f"{path}: query {qi + 1} image {imname} is not in Images.mat")
        if reference is None:
            reference, first = queries, path
        elif queries != reference:
            raise PsearchError(
                f"{path}: lists different queries from {first.name} ({_first_difference(reference, queries)})"
            )
        galleries.append(gallery)
    return reference, galleries


def read_protocol(path: Path, var: str, size: int, image_of: dict[str, int]):
    """(queries, Gallery) of one TestG file: the vectorised reader, else loadmat."""
    if not path.is_file():
        raise PsearchError(f"{path}: file not found")
    fast = matfast.read_protocol(path, var, image_of)
    if fast is not None:
        return fast.queries, Gallery(size, fast.query, fast.image, fast.gt)
    return read_protocol_loadmat(path, var, size, image_of)


def read_protocol_loadmat(path: Path, var: str, size: int, image_of: dict[str, int]):
    _, value = mf.load_variable(path, var)
    queries, q_col, img_col, gt = [], [], [], []
    for qi, rec in enumerate(mf.struct_elements(value, f"{path}: {var}")):
        where = f"{path}: {var}({qi + 1})"
        queries.append(_read_query(rec, where))
        for k, g in enumerate(
            mf.struct_elements(mf.field(rec, "Gallery", where), f"{where}.Gallery")
        ):
            gwhere = f"{where}.Gallery({k + 1})"
            imname = mf.text(mf.field(g, "imname", gwhere), f"{gwhere}.imname")
            if imname not in image_of:
                raise PsearchError(f"{gwhere}: gallery image {imname} is not in Images.mat")
            box = mf.box(mf.field(g, "idlocate", gwhere), f"{gwhere}.idlocate")
            q_col.append(qi)
            img_col.append(image_of[imname])
            gt.append(box if box is not None else (np.nan,) * 4)
    gallery = Gallery(
        size,
        np.array(q_col, dtype=np.int32),
        np.array(img_col, dtype=np.int32),
        np.array(gt, dtype=np.float64).reshape(-1, 4),
    )
    return queries, gallery


def _first_difference(a, b) -> str:
    if len(a) != len(b):
        return f"{len(b)} queries instead of {len(a)}"
    k = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"query {k + 1} is {b[k][0]} {b[k][2]} instead of {a[k][0]} {a[k][2]}"


def _label_gallery_boxes(g: Gallery, path, size, names, query_person, index, person) -> None:
    has = ~np.isnan(g.gt[:, 0])
    for row in np.flatnonzero(has):
        qi = int(g.query[row])
        imname = names[int(g.image[row])]
        box = tuple(float(v) for v in g.gt[row])
        where = f"{path} (query {qi + 1}, gallery image {imname})"
        person[index.find(imname, box, where)] = query_person[qi]


def _read_subsets(directory: Path, queries, query_xywh):
    """Subset membership from the subset files (same image, same box), else derived."""
    position = {(imname, box): qi for qi, (imname, box, _) in enumerate(queries)}
    masks, sources, files = {}, {}, []
    for key, (filename, var) in SUBSETS.items():
        path = directory / filename
        mask = np.zeros(len(queries), dtype=bool)
        if path.exists():
            _, value = mf.load_variable(path, var)
            for k, rec in enumerate(mf.struct_elements(value, f"{path}: {var}")):
                imname, box, _ = _read_query(rec, f"{path}: {var}({k + 1})")
                if (imname, box) not in position:
                    raise PsearchError(
                        f"{path}: {var}({k + 1}) query box in {imname} matches no query of the protocol files"
                    )
                mask[position[(imname, box)]] = True
            sources[key] = "files"
            files.append(path)
        elif key == "low_resolution":
            mask = low_resolution_mask(query_xywh[:, 3])
            sources[key] = "derived: the 10% of queries with the smallest box height"
        else:
            sources[key] = f"absent: no {filename}, so the occlusion subset is empty"
        masks[key] = mask
    subsets = {k: {"source": sources[k], "queries": int(masks[k].sum())} for k in SUBSETS}
    return subsets, masks["occlusion"], masks["low_resolution"], files
