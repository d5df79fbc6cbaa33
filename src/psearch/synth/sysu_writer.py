"""Writing a dataset plan as CUHK-SYSU's annotation files (annotation/*.mat, docs/data.md).

Variable names, struct field orders, cell-versus-struct choices and shapes are
those `scipy.io.loadmat` shows for the release: `Img` 1 x N struct, `pool` N x 1
cell, `Train` N x 1 cell of 1 x 1 structs, `TestG<G>` 1 x Q struct of
Query / Gallery, 1 x 0 empty `idlocate` for gallery images without the person.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from psearch.synth import matwriter as mw
from psearch.synth.plan import DatasetPlan, Figure

SCENE_FIELDS = ["imname", "idlocate", "ishard"]
EMPTY_BOX = np.zeros((1, 0))
LEVEL = 0  # uncompressed, as scipy.io.savemat writes by default (the reader takes both)


def _box(box) -> bytes:
    return mw.double([list(map(float, box))])


def _scene_entry(name: str, fig: Figure) -> bytes:
    return mw.char(name) + _box(fig.box) + mw.scalar(float(fig.hard))


def write_annotations(plan: DatasetPlan, root: Path) -> list[Path]:
    """Write every annotation file under `root/annotation`; returns their paths."""
    ann = root / "annotation"
    written = [
        _write_images(plan, ann / "Images.mat"),
        _write_persons(plan, ann / "Person.mat"),
        _write_pool(plan, ann / "pool.mat"),
        _write_train(plan, ann / "test" / "train_test" / "Train.mat"),
    ]
    written += _write_protocols(plan, ann / "test")
    return written


def _write_images(plan: DatasetPlan, path: Path) -> Path:
    entries = []
    for scene in plan.scenes:
        boxes = scene.annotated_boxes()
        box_elems = [[_box(b), mw.scalar(float(f.hard) if f else 0.0)] for b, f in boxes]
        entries.append(
            [
                mw.char(scene.name),
                mw.scalar(len(boxes)),
                mw.struct(["idlocate", "ishard"], box_elems),
            ]
        )
    mw.write_mat(path, {"Img": mw.struct(["imname", "nAppear", "box"], entries)}, LEVEL)
    return path


def _named_people(plan: DatasetPlan) -> list[tuple[str, list[tuple[int, Figure]]]]:
    """Every named person: the split's identities, then background people the release also names."""
    named = [
        (plan.identity_names[pid], plan.appearances[pid]) for pid in plan.train_ids + plan.test_ids
    ]
    extra = plan.identity_names[len(named) :]
    background = [(i, f) for i, s in enumerate(plan.scenes) for f in s.figures() if f.identity < 0]
    rng = np.random.default_rng([plan.seed, 3])
    picks = rng.choice(len(background), size=min(len(extra), len(background)), replace=False)
    named += [(name, [background[int(k)]]) for name, k in zip(extra, picks, strict=False)]
    return named


def _person_struct(plan: DatasetPlan, name: str, appearances) -> list[bytes]:
    scenes = [_scene_entry(plan.scenes[i].name, f) for i, f in appearances]
    return [mw.char(name), mw.scalar(len(scenes)), mw.struct(SCENE_FIELDS, scenes)]


def _write_persons(plan: DatasetPlan, path: Path) -> Path:
    people = [_person_struct(plan, name, apps) for name, apps in _named_people(plan)]
    mw.write_mat(path, {"Person": mw.struct(["idname", "nAppear", "scene"], people)}, LEVEL)
    return path


def _write_pool(plan: DatasetPlan, path: Path) -> Path:
    names = [mw.char(plan.scenes[i].name) for i in plan.test_scenes()]
    mw.write_mat(path, {"pool": mw.cell(names)}, LEVEL)
    return path


def _write_train(plan: DatasetPlan, path: Path) -> Path:
    items = []
    for pid in plan.train_ids:
        fields = _person_struct(plan, plan.identity_names[pid], plan.appearances[pid])
        items.append(mw.struct(["idname", "nAppear", "scene"], [fields], shape=(1, 1)))
    mw.write_mat(path, {"Train": mw.cell(items)}, LEVEL)
    return path


def _query_struct(plan: DatasetPlan, qi: int) -> bytes:
    q = plan.queries[qi]
    fig = next(f for i, f in plan.appearances[q.identity] if i == q.image)
    fields = [
        mw.char(plan.scenes[q.image].name),
        _box(q.box),
        mw.scalar(float(fig.hard)),
        mw.char(plan.identity_names[q.identity]),
    ]
    return mw.struct(["imname", "idlocate", "ishard", "idname"], [fields], shape=(1, 1))


def _gallery_structs(plan: DatasetPlan, size: int, distractor: dict[int, bytes]) -> list[bytes]:
    out = []
    for qi, q in enumerate(plan.queries):
        row = plan.galleries[size][qi]
        n_pos = len(plan.positives(qi))
        entries = [
            _scene_entry(plan.scenes[int(s)].name, _figure_of(plan, q.identity, int(s)))
            for s in row[:n_pos]
        ]
        entries += [distractor[int(s)] for s in row[n_pos:]]
        out.append(mw.struct(SCENE_FIELDS, entries))
    return out


def _figure_of(plan: DatasetPlan, identity: int, scene: int) -> Figure:
    return next(f for i, f in plan.appearances[identity] if i == scene)


def _write_protocols(plan: DatasetPlan, test_dir: Path) -> list[Path]:
    distractor = {
        i: mw.char(plan.scenes[i].name) + mw.double(EMPTY_BOX) + mw.scalar(0.0)
        for i in plan.test_scenes()
    }
    queries = [_query_struct(plan, qi) for qi in range(len(plan.queries))]
    written = []
    gallery_100 = None
    for size in sorted(plan.galleries):
        galleries = _gallery_structs(plan, size, distractor)
        if size == 100:
            gallery_100 = galleries
        var = f"TestG{size}"
        path = test_dir / "train_test" / f"{var}.mat"
        pairs = [[q, g] for q, g in zip(queries, galleries, strict=True)]
        value = mw.struct_parts(["Query", "Gallery"], pairs, name=var)  # streamed: up to 2 GB
        mw.write_mat(path, {var: value}, LEVEL)
        written.append(path)
    if gallery_100 is not None:
        occluded = [qi for qi, q in enumerate(plan.queries) if q.occluded]
        occ = []
        for qi in occluded:
            fraction = _figure_of(plan, plan.queries[qi].identity, plan.queries[qi].image).occlusion
            occ.append([queries[qi], gallery_100[qi], mw.scalar(round(fraction, 3))])
        path = test_dir / "subset" / "Occlusion.mat"
        mw.write_mat(path, {"Occlusion1": mw.struct(["Query", "Gallery", "occlusion"], occ)}, LEVEL)
        res = [[queries[qi], gallery_100[qi]] for qi in plan.low_resolution]
        path2 = test_dir / "subset" / "Resolution.mat"
        mw.write_mat(path2, {"Test_Size": mw.struct(["Query", "Gallery"], res)}, LEVEL)
        written += [path, path2]
    return written
