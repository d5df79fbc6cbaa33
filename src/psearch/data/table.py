"""`psearch ingest --format table`: one CSV or Parquet row per person box -> a `ParsedDataset`.

Columns (docs/own-data.md): `image` (path relative to the dataset root, never outside it),
the box as `x1, y1, x2, y2` (box_format xyxy) or `x, y, w, h` (xywh), `person_id` (any text or
number; empty = an unlabelled person), `split` (train / test), optional `camera`,
`frame_time` (seconds) and `is_hard`. A row whose four box cells are all empty lists an image
without people (a distractor). Row numbers in errors count data rows from 1 (the header is
row 0), so CSV row N is line N + 1 of the file when no cell spans lines.

Queries come from a second table (`image`, the box, `person_id`, optional `occluded` and
`low_resolution`) or are drawn by a seeded rule: for every test identity, in person-id
order, and every camera it appears in (sorted; no camera column = one camera), one of its
boxes there, chosen uniformly with numpy's default_rng(seed); identities seen in a single
test image get none (nothing to find). Galleries: the whole test set (gallery_size -1, as
PRW: rows list the test images holding the person, the query's own image excluded) and, per
asked size N, the images holding the person plus distractors drawn from the same generator
up to N images, in image-id order; a size of N >= the number of test images is skipped
(recorded in dataset.json). Camera and frame time go to an extra table, image_meta.parquet.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from psearch.data.records import Gallery, ParsedDataset, inside_root, low_resolution_mask
from psearch.errors import PsearchError

BOX_COLUMNS = {"xyxy": ("x1", "y1", "x2", "y2"), "xywh": ("x", "y", "w", "h")}
SPLITS = ("train", "test")
TRUE_WORDS = {"true", "1", "yes", "t", "y"}
FALSE_WORDS = {"false", "0", "no", "f", "n", ""}
IMAGE_META_SCHEMA = pa.schema(
    [("image_id", pa.int32()), ("camera", pa.string()), ("frame_time", pa.float64())]
)


@dataclass(frozen=True)
class TableOptions:
    """What `ingest --format table` needs besides the dataset root."""

    annotations: Path
    queries: Path | None = None
    box_format: str = "xyxy"
    gallery_sizes: tuple[int, ...] = (50, 100)
    seed: int = 0


@dataclass
class _Table:
    """One input table as Python lists per column, with row-precise error messages."""

    path: Path
    columns: dict[str, list[Any]]
    rows: int
    extras: dict[str, Any] = field(default_factory=dict)

    def fail(self, row: int, column: str, message: str) -> PsearchError:
        return PsearchError(f"{self.path}: row {row + 1}, column {column}: {message}")

    def has(self, column: str) -> bool:
        return column in self.columns

    def require(self, names: tuple[str, ...], hint: str = "") -> None:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise PsearchError(
                f"{self.path}: missing column {missing[0]!r} (columns: "
                f"{', '.join(self.columns) or 'none'}){hint}"
            )

    def text(self, column: str, row: int, required: bool = True) -> str | None:
        value = self.columns[column][row]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            if required:
                raise self.fail(row, column, "empty")
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # a Parquet float column of ids: 3.0 is person "3"
        text = str(value).strip()
        if not text:
            if required:
                raise self.fail(row, column, "empty")
            return None
        return text

    def number(self, column: str, row: int) -> float:
        """The cell as a finite float, NaN when empty."""
        value = self.columns[column][row]
        if value is None or (isinstance(value, str) and not value.strip()):
            return float("nan")
        if isinstance(value, bool):
            raise self.fail(row, column, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.fail(row, column, f"expected a number, got {value!r}") from None
        if np.isinf(number):
            raise self.fail(row, column, f"expected a finite number, got {value!r}")
        return number

    def flag(self, column: str, row: int) -> bool:
        value = self.columns[column][row]
        if value is None or isinstance(value, bool):
            return bool(value)
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise self.fail(row, column, f"expected true or false, got {value!r}")

    def box(self, row: int, box_format: str) -> tuple[float, float, float, float] | None:
        """[x y w h] of the row, None when all four cells are empty."""
        names = BOX_COLUMNS[box_format]
        values = [self.number(c, row) for c in names]
        empty = [np.isnan(v) for v in values]
        if all(empty):
            return None
        if any(empty):
            raise self.fail(row, names[empty.index(True)], "empty (give all four box values)")
        a, b, c, d = values
        w, h = (c - a, d - b) if box_format == "xyxy" else (c, d)
        if w <= 0 or h <= 0:
            column = names[2] if w <= 0 else names[3]
            raise self.fail(
                row, column, f"the box has no area ({box_format} {a:g} {b:g} {c:g} {d:g})"
            )
        return (a, b, w, h)


def read_table_file(path: Path) -> _Table:
    """A CSV or Parquet file as columns of Python values (CSV: empty cells are None)."""
    path = Path(path)
    if not path.is_file():
        raise PsearchError(f"{path}: annotations file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True)
            )
        elif suffix in (".parquet", ".pq"):
            with pq.ParquetFile(path) as parquet:
                table = parquet.read()
        else:
            raise PsearchError(f"{path}: expected a .csv or .parquet file")
    except (OSError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PsearchError(f"{path}: not a readable {suffix[1:]} table ({first})") from None
    names = [n.strip() for n in table.column_names]
    if len(set(names)) != len(names):
        raise PsearchError(f"{path}: duplicate column names ({', '.join(names)})")
    columns = {n: table.column(i).to_pylist() for i, n in enumerate(names)}
    return _Table(path, columns, table.num_rows)


def row_image_path(table: _Table, row: int) -> str:
    """The row's image path, normalised, refused when absolute or leaving the root."""
    raw = table.text("image", row)
    path = inside_root(raw)
    if path is None:
        raise table.fail(row, "image", f"{raw!r} is not a path inside the dataset root")
    return path


class _Images:
    """Images in order of first appearance, their split / camera / time, checked per row."""

    def __init__(self, table: _Table, root: Path) -> None:
        self.table, self.root = table, root
        self.index: dict[str, int] = {}
        self.paths: list[str] = []
        self.splits: list[str] = []
        self.cameras: list[str | None] = []
        self.times: list[float] = []
        self.first_row: list[int] = []

    def add(self, row: int) -> int:
        t = self.table
        path = row_image_path(t, row)
        split = t.text("split", row)
        if split not in SPLITS:
            raise t.fail(row, "split", f"{split!r} is not one of {', '.join(SPLITS)}")
        camera = t.text("camera", row, required=False) if t.has("camera") else None
        time = t.number("frame_time", row) if t.has("frame_time") else float("nan")
        image = self.index.get(path)
        if image is None:
            if not (self.root / path).is_file():
                raise t.fail(row, "image", f"{self.root / path}: image not found")
            image = self.index[path] = len(self.paths)
            self.paths.append(path)
            self.splits.append(split)
            self.cameras.append(camera)
            self.times.append(time)
            self.first_row.append(row)
            return image
        first = self.first_row[image] + 1
        if split != self.splits[image]:
            raise t.fail(
                row, "split", f"{split} but row {first} puts {path} in {self.splits[image]}"
            )
        if camera != self.cameras[image]:
            raise t.fail(row, "camera", f"{camera} but row {first} gives {self.cameras[image]}")
        if not (time == self.times[image] or (np.isnan(time) and np.isnan(self.times[image]))):
            raise t.fail(row, "frame_time", f"{time:g} but row {first} gives {self.times[image]:g}")
        return image

    def names(self) -> list[str]:
        """File names when they are unique, else the relative paths."""
        base = [posixpath.basename(p) for p in self.paths]
        return base if len(set(base)) == len(base) else list(self.paths)


def read_table(root: Path, options: TableOptions) -> ParsedDataset:
    if options.box_format not in BOX_COLUMNS:
        raise PsearchError(
            f"box format {options.box_format!r} is not one of {', '.join(BOX_COLUMNS)}"
        )
    for size in options.gallery_sizes:
        if size < 1:
            raise PsearchError(f"ingest.gallery_sizes: {size} is not a positive size")
    table = read_table_file(options.annotations)
    _require_box_columns(table, options.box_format)
    table.require(("image", "split", "person_id"))
    images = _Images(table, root)
    box_image, box_xywh, box_hard, box_name = [], [], [], []
    seen: dict[tuple[int, str], int] = {}
    for row in range(table.rows):
        image = images.add(row)
        box = table.box(row, options.box_format)
        name = table.text("person_id", row, required=False)
        if box is None:
            if name is not None:
                raise table.fail(row, "person_id", f"{name!r} given for a row without a box")
            continue
        if name is not None:
            if (image, name) in seen:
                raise table.fail(
                    row,
                    "person_id",
                    f"person {name} already has a box in {images.paths[image]} (row {seen[(image, name)] + 1})",
                )
            seen[(image, name)] = row
        box_image.append(image)
        box_xywh.append(box)
        box_hard.append(table.flag("is_hard", row) if table.has("is_hard") else False)
        box_name.append(name)
    if not images.paths:
        raise PsearchError(f"{options.annotations}: no rows")
    person_names, person_splits = _persons(table, images, box_image, box_name)
    pid = {name: k for k, name in enumerate(person_names)}
    box_person = np.array([pid[n] if n is not None else -1 for n in box_name], dtype=np.int32)
    boxes = _Boxes(
        np.array(box_image, dtype=np.int32),
        np.array(box_xywh, dtype=np.float64).reshape(-1, 4),
        box_person,
    )
    rng = np.random.default_rng(options.seed)
    if options.queries is not None:
        queries = _given_queries(options, images, boxes, pid)
        query_rule = f"listed in {options.queries}"
    else:
        queries = _drawn_queries(images, boxes, person_splits, rng)
        query_rule = (
            f"drawn: one per test identity per camera (seed {options.seed}); identities in a "
            "single test image get none"
        )
    galleries, skipped = _galleries(images, boxes, queries, options.gallery_sizes, rng)
    files = [options.annotations] + ([options.queries] if options.queries else [])
    return ParsedDataset(
        name=root.resolve().name,
        format="table",
        image_names=images.names(),
        image_paths=images.paths,
        image_splits=images.splits,
        box_image=boxes.image,
        box_xywh=boxes.xywh,
        box_person=boxes.person,
        box_hard=np.array(box_hard, dtype=bool),
        person_names=person_names,
        person_splits=person_splits,
        query_person=queries.person,
        query_image=queries.image,
        query_xywh=queries.xywh,
        query_occluded=queries.occluded,
        query_low_resolution=queries.low_resolution,
        galleries=galleries,
        annotation_files=[Path(f) for f in files],
        info={
            "subsets": queries.subsets,
            "box_format": options.box_format,
            "queries_rule": query_rule,
            "gallery_sizes_skipped": skipped,
        },
        extra_tables=_image_meta(table, images),
    )


def _require_box_columns(table: _Table, box_format: str) -> None:
    other = "xywh" if box_format == "xyxy" else "xyxy"
    hint = ""
    if all(table.has(c) for c in BOX_COLUMNS[other]):
        hint = f"; the table has {', '.join(BOX_COLUMNS[other])}: use --box-format {other}"
    table.require(BOX_COLUMNS[box_format], hint)


def _persons(table: _Table, images: _Images, box_image, box_name):
    """Names and splits, training identities first, each in order of first appearance."""
    first: dict[str, tuple[int, str]] = {}
    for k, name in enumerate(box_name):
        if name is None:
            continue
        split = images.splits[box_image[k]]
        if name not in first:
            first[name] = (k, split)
        elif first[name][1] != split:
            raise PsearchError(
                f"{table.path}: person_id {name} is in both train and test images "
                f"({images.paths[box_image[first[name][0]]]} and {images.paths[box_image[k]]}); "
                "identities must not cross the split"
            )
    names = [n for n, (_, s) in first.items() if s == "train"]
    names += [n for n, (_, s) in first.items() if s == "test"]
    return names, [first[n][1] for n in names]


@dataclass
class _Boxes:
    image: np.ndarray
    xywh: np.ndarray
    person: np.ndarray

    def of_person(self, person: int) -> np.ndarray:
        return np.flatnonzero(self.person == person)


@dataclass
class _Queries:
    person: np.ndarray
    image: np.ndarray
    xywh: np.ndarray
    occluded: np.ndarray
    low_resolution: np.ndarray
    subsets: dict[str, Any]


def _given_queries(options: TableOptions, images: _Images, boxes: _Boxes, pid) -> _Queries:
    table = read_table_file(options.queries)
    _require_box_columns(table, options.box_format)
    table.require(("image", "person_id"))
    person, image, xywh, occluded, low = [], [], [], [], []
    for row in range(table.rows):
        path = row_image_path(table, row)
        if path not in images.index:
            raise table.fail(row, "image", f"{path} is not in {options.annotations}")
        i = images.index[path]
        if images.splits[i] != "test":
            raise table.fail(
                row, "image", f"{path} is a {images.splits[i]} image, not a test image"
            )
        name = table.text("person_id", row)
        p = pid.get(name, -1)
        holding = boxes.image[boxes.of_person(p)] if p >= 0 else np.zeros(0)
        if i not in holding:
            raise table.fail(row, "person_id", f"person {name} has no box in {path}")
        if len(np.unique(holding)) < 2:
            raise table.fail(row, "person_id", f"person {name} is in no other test image")
        box = table.box(row, options.box_format)
        if box is None:
            raise table.fail(row, BOX_COLUMNS[options.box_format][0], "empty query box")
        person.append(p)
        image.append(i)
        xywh.append(box)
        occluded.append(table.flag("occluded", row) if table.has("occluded") else False)
        low.append(table.flag("low_resolution", row) if table.has("low_resolution") else False)
    if not person:
        raise PsearchError(f"{options.queries}: no queries")
    xywh_arr = np.array(xywh, dtype=np.float64).reshape(-1, 4)
    subsets = {
        "occlusion": _subset_source(table, "occluded", occluded),
        "low_resolution": _subset_source(table, "low_resolution", low),
    }
    if not table.has("low_resolution"):
        low = low_resolution_mask(xywh_arr[:, 3]).tolist()
        subsets["low_resolution"] = {
            "source": "derived: the 10% of queries with the smallest box height",
            "queries": int(sum(low)),
        }
    return _Queries(
        np.array(person, dtype=np.int32),
        np.array(image, dtype=np.int32),
        xywh_arr,
        np.array(occluded, dtype=bool),
        np.array(low, dtype=bool),
        subsets,
    )


def _subset_source(table: _Table, column: str, members: list[bool]) -> dict[str, Any]:
    if table.has(column):
        return {"source": f"column {column} of {table.path.name}", "queries": int(sum(members))}
    return {"source": f"absent: no {column} column", "queries": 0}


def _drawn_queries(images: _Images, boxes: _Boxes, person_splits, rng) -> _Queries:
    person, image, xywh = [], [], []
    for p, split in enumerate(person_splits):
        if split != "test":
            continue
        mine = boxes.of_person(p)
        if len(np.unique(boxes.image[mine])) < 2:
            continue
        cameras = np.array([images.cameras[i] or "" for i in boxes.image[mine]], dtype=object)
        for camera in sorted(set(cameras.tolist())):
            candidates = mine[cameras == camera]
            pick = int(candidates[rng.integers(len(candidates))])
            person.append(p)
            image.append(int(boxes.image[pick]))
            xywh.append(boxes.xywh[pick])
    xywh_arr = np.array(xywh, dtype=np.float64).reshape(-1, 4)
    low = low_resolution_mask(xywh_arr[:, 3])
    subsets = {
        "occlusion": {"source": "absent: drawn queries carry no occlusion flag", "queries": 0},
        "low_resolution": {
            "source": "derived: the 10% of queries with the smallest box height",
            "queries": int(low.sum()),
        },
    }
    return _Queries(
        np.array(person, dtype=np.int32),
        np.array(image, dtype=np.int32),
        xywh_arr,
        np.zeros(len(person), dtype=bool),
        low,
        subsets,
    )


def _galleries(images: _Images, boxes: _Boxes, queries: _Queries, sizes, rng):
    """The whole-test-set protocol and one per size that fits; (galleries, skipped sizes)."""
    test = np.array([i for i, s in enumerate(images.splits) if s == "test"], dtype=np.int32)
    fitting = sorted(s for s in set(sizes) if s < len(test))
    skipped = sorted(s for s in set(sizes) if s >= len(test))
    rows: dict[int, tuple[list, list, list]] = {s: ([], [], []) for s in [-1, *fitting]}
    for q, (p, own) in enumerate(zip(queries.person, queries.image, strict=True)):
        mine = boxes.of_person(int(p))
        holding, first = np.unique(boxes.image[mine], return_index=True)
        keep = holding != own
        positives, gt = holding[keep], boxes.xywh[mine[first[keep]]]
        _append(rows[-1], q, positives, gt)
        others = np.setdiff1d(test, np.append(holding, own))
        for size in fitting:
            take = min(size, len(positives))
            drawn = rng.choice(others, size=min(size - take, len(others)), replace=False)
            chosen = np.concatenate([positives[:take], np.sort(drawn)])
            order = np.argsort(chosen, kind="stable")
            gt_rows = np.concatenate([gt[:take], np.full((len(drawn), 4), np.nan)])
            _append(rows[size], q, chosen[order], gt_rows[order])
    galleries = [
        Gallery(
            size,
            np.array(qs, dtype=np.int32),
            np.array(ims, dtype=np.int32),
            np.array(gts, dtype=np.float64).reshape(-1, 4),
        )
        for size, (qs, ims, gts) in rows.items()
    ]
    return galleries, skipped


def _append(rows, query: int, image_ids, gt) -> None:
    qs, ims, gts = rows
    qs.extend([query] * len(image_ids))
    ims.extend(int(i) for i in image_ids)
    gts.extend(np.asarray(gt, dtype=np.float64).reshape(-1, 4).tolist())


def _image_meta(table: _Table, images: _Images) -> dict[str, pa.Table]:
    """image_meta.parquet (camera, frame_time per image) when the table has either column."""
    if not (table.has("camera") or table.has("frame_time")):
        return {}
    times = np.array(images.times, dtype=np.float64)
    columns = [
        pa.array(np.arange(len(images.paths), dtype=np.int32)),
        pa.array(images.cameras, type=pa.string()),
        pa.array(times, mask=np.isnan(times)),
    ]
    return {"image_meta": pa.Table.from_arrays(columns, schema=IMAGE_META_SCHEMA)}
