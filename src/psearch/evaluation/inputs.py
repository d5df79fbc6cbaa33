"""Evaluation inputs: manifests + detections + query features as checked numpy arrays.

Everything the evaluator needs is turned into dense arrays once, here, so the
scoring code can stay free of lookups. Bad input (unknown or non-test image
ids, NaN/inf values, a missing query, mismatched feature sizes) is a one-line
`PsearchError` naming the file and value. An empty detections file is not an error: a
model that finds nobody scores zero (with a warning).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from psearch.data.manifest import (
    GALLERY_DETECTIONS,
    QUERY_FEATURES,
    Manifests,
    feature_dim,
    gallery_detections_schema,
    query_features_schema,
    read_parquet,
)
from psearch.errors import PsearchError

# A feature whose norm is further than this from 1 triggers the normalisation warning.
UNIT_NORM_TOLERANCE = 1e-3
_CAMERA = re.compile(r"^c(\d+)")


@dataclass
class Detections:
    """Rows of gallery_detections.parquet, grouped by test image (file order kept within one)."""

    image: np.ndarray  # (N,) index into EvalData.image_ids
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float32
    features: np.ndarray  # (N, D) float32, unit length


@dataclass
class EvalData:
    """One dataset's test split with its detections and query features, as arrays."""

    image_ids: np.ndarray  # (T,) image_id of every test image
    image_names: list[str]  # (T,)
    detections: Detections
    gt_image: np.ndarray  # (B,) test image index of every annotated box of a test image
    gt_boxes: np.ndarray  # (B, 4) float32
    gt_labelled: np.ndarray  # (B,) person_id >= 0
    query_ids: np.ndarray  # (Q,) in queries.parquet order
    query_image: np.ndarray  # (Q,) test image index of the query's image, -1 if not a test image
    query_image_names: list[str]  # (Q,) for the query's camera and reports
    query_boxes: np.ndarray  # (Q, 4) float32
    query_features: np.ndarray  # (Q, D) float32, unit length
    occluded: np.ndarray  # (Q,) bool
    low_resolution: np.ndarray  # (Q,) bool

    def test_index(self, image_ids: np.ndarray, where: str) -> np.ndarray:
        """Map image ids to test-image indices; an id that is not a test image is an error."""
        message = f"{where}: image_id {{}} is not a test image of the manifests"
        return map_ids(_lookup(self.image_ids), image_ids, message)

    def query_index(self, query_ids: np.ndarray, where: str) -> np.ndarray:
        """Map query ids to query rows; an unknown id is an error."""
        return map_ids(_lookup(self.query_ids), query_ids, f"{where}: query_id {{}} is not a query")

    def cameras(self) -> tuple[np.ndarray, np.ndarray]:
        """Camera numbers (the digits after 'c' in e.g. c3s1_000123.jpg) of test images, queries."""
        return _cameras(self.image_names), _cameras(self.query_image_names)


def _cameras(names: list[str]) -> np.ndarray:
    cams = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        match = _CAMERA.match(name)
        if match is None:
            raise PsearchError(
                f"cross_camera: image name {name!r} has no camera number "
                "(expected PRW-style names like c3s1_000123.jpg)"
            )
        cams[i] = int(match.group(1))
    return cams


def _lookup(ids: np.ndarray) -> np.ndarray:
    """Dense array: lookup[id] = position of id in `ids`, -1 elsewhere."""
    size = int(ids.max()) + 1 if len(ids) else 0
    lookup = np.full(size, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    return lookup


def map_ids(lookup: np.ndarray, ids: np.ndarray, message: str) -> np.ndarray:
    """lookup[ids] as int32; an id outside `lookup` or mapped to -1 is `message`.format(id)."""
    ids = np.asarray(ids)
    inside = (ids >= 0) & (ids < len(lookup))
    if inside.all():
        idx = lookup.astype(np.int32)[ids]
    else:
        idx = np.full(len(ids), -1, dtype=np.int32)
        idx[inside] = lookup[ids[inside]]
    if (idx < 0).any():
        raise PsearchError(message.format(int(ids[np.argmax(idx < 0)])))
    return idx


def _features(table: pa.Table, path: Path) -> np.ndarray:
    dim = feature_dim(table, path)
    column = table.column("feature").combine_chunks()
    if column.null_count:
        raise PsearchError(f"{path}: column 'feature' has {column.null_count} null rows")
    values = arrow_numpy(column.flatten())
    feats = np.asarray(values, dtype=np.float32).reshape(len(table), dim)
    if not np.isfinite(feats).all():
        row = int(np.argmax(~np.isfinite(feats).all(axis=1)))
        raise PsearchError(f"{path}: feature of row {row} has NaN or inf values")
    return feats


def _unit_length(feats: np.ndarray, path: Path) -> np.ndarray:
    """Features as given when unit length; otherwise warn and L2-normalise them."""
    norms = np.linalg.norm(feats.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0)
    if len(off) == 0 or off.max() <= UNIT_NORM_TOLERANCE:
        return feats
    print(
        f"warning: {path}: features are not unit length (norm {norms[np.argmax(off)]:.4g}); "
        "normalising them",
        file=sys.stderr,
    )
    safe = np.where(norms > 0, norms, 1.0)
    return (feats / safe[:, None]).astype(np.float32)


_NUMPY_TYPES = {
    pa.int32(): np.int32,
    pa.int64(): np.int64,
    pa.float32(): np.float32,
    pa.float64(): np.float64,
}


def _bits(buffer, offset: int, length: int) -> np.ndarray:
    packed = np.frombuffer(buffer, dtype=np.uint8)
    return np.unpackbits(packed, bitorder="little")[offset : offset + length].astype(bool)


def arrow_numpy(array: pa.Array, nulls_as_nan: bool = True) -> np.ndarray:
    """A numeric or boolean Arrow array as numpy, nulls as NaN, read straight from its
    buffers: pyarrow's own to_numpy imports pandas (~0.5-1 s of process start-up)."""
    n, offset = len(array), array.offset
    if n == 0:
        return np.empty(0, dtype=bool if array.type == pa.bool_() else _NUMPY_TYPES[array.type])
    validity, data = array.buffers()[:2]
    if array.type == pa.bool_():
        values = _bits(data, offset, n)
    else:
        values = np.frombuffer(data, dtype=_NUMPY_TYPES[array.type])[offset : offset + n]
    if array.null_count and nulls_as_nan:
        values = values.astype(np.float32 if array.type == pa.float32() else np.float64)
        values[~_bits(validity, offset, n)] = np.nan
    return values


def numpy_arrow(values: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """The other direction, also without pandas: a numeric numpy array (nulls where `null`)."""
    values = np.ascontiguousarray(values)
    kind = {np.dtype(v): k for k, v in _NUMPY_TYPES.items()}[values.dtype]
    validity = None
    if null is not None and null.any():
        validity = pa.py_buffer(np.packbits(~null, bitorder="little"))
    return pa.Array.from_buffers(kind, len(values), [validity, pa.py_buffer(values)])


def repeated_string(text: str, n: int) -> pa.Array:
    data = text.encode()
    offsets = (np.arange(n + 1) * len(data)).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)]
    )


def column_numpy(table: pa.Table, name: str, nulls_as_nan: bool = True) -> np.ndarray:
    """A column as numpy; with nulls_as_nan=False, null slots hold whatever the buffer has."""
    return arrow_numpy(table.column(name).combine_chunks(), nulls_as_nan)


def column_valid(table: pa.Table, name: str) -> np.ndarray:
    """Which rows of a column are not null."""
    array = table.column(name).combine_chunks()
    if not array.null_count:
        return np.ones(len(array), dtype=bool)
    return _bits(array.buffers()[0], array.offset, len(array))


def _column(table: pa.Table, name: str, dtype) -> np.ndarray:
    return np.asarray(column_numpy(table, name), dtype=dtype)


def _boxes(table: pa.Table, names=("x1", "y1", "x2", "y2")) -> np.ndarray:
    return np.stack([_column(table, n, np.float32) for n in names], axis=1).reshape(-1, 4)


def _check_finite(values: np.ndarray, path: Path, what: str) -> None:
    if not np.isfinite(values).all():
        row = int(np.argmax(~np.isfinite(values.reshape(len(values), -1)).all(axis=1)))
        raise PsearchError(f"{path}: {what} of row {row} is NaN or inf")


def read_detections(directory: Path) -> tuple[pa.Table, pa.Table]:
    """The two contract tables of a detections directory (schema-checked)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PsearchError(f"{directory}: detections directory not found")
    det_path, query_path = directory / GALLERY_DETECTIONS, directory / QUERY_FEATURES
    dets = read_parquet(det_path)
    dets = read_parquet(det_path, gallery_detections_schema(feature_dim(dets, det_path)))
    queries = read_parquet(query_path)
    queries = read_parquet(query_path, query_features_schema(feature_dim(queries, query_path)))
    return dets, queries


def build_eval_data(
    manifests: Manifests,
    dets: pa.Table,
    query_feats: pa.Table,
    det_path: Path = Path(GALLERY_DETECTIONS),
    query_path: Path = Path(QUERY_FEATURES),
) -> EvalData:
    """Check the detection tables against the manifests and return the evaluator's arrays."""
    images = manifests.images
    test = np.asarray(images.column("split").to_pylist()) == "test"
    image_ids = _column(images, "image_id", np.int64)[test]
    names = [n for n, t in zip(images.column("image_name").to_pylist(), test, strict=True) if t]
    if len(image_ids) == 0:
        raise PsearchError(f"{manifests.root}/images.parquet: no test images")
    if len(dets) == 0:  # a weak model scores zero; it does not break the pipeline
        print(f"warning: {det_path}: no detections; every metric is 0", file=sys.stderr)
    det_dim, query_dim = feature_dim(dets, det_path), feature_dim(query_feats, query_path)
    if det_dim != query_dim:
        raise PsearchError(
            f"{query_path}: feature size {query_dim} differs from {det_path} ({det_dim})"
        )

    data = EvalData(
        image_ids=image_ids,
        image_names=names,
        detections=None,  # type: ignore[arg-type]  # filled below, needs test_index
        gt_image=np.empty(0, np.int64),
        gt_boxes=np.empty((0, 4), np.float32),
        gt_labelled=np.empty(0, bool),
        query_ids=np.empty(0, np.int64),
        query_image=np.empty(0, np.int64),
        query_image_names=[],
        query_boxes=np.empty((0, 4), np.float32),
        query_features=np.empty((0, det_dim), np.float32),
        occluded=np.empty(0, bool),
        low_resolution=np.empty(0, bool),
    )

    # Detections: ids must be test images; values finite; grouped by image, file order kept.
    det_image = data.test_index(_column(dets, "image_id", np.int64), str(det_path))
    boxes, scores = _boxes(dets), _column(dets, "score", np.float32)
    _check_finite(boxes, det_path, "box")
    _check_finite(scores, det_path, "score")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        row = int(np.argmax((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])))
        raise PsearchError(f"{det_path}: box of row {row} has x2 < x1 or y2 < y1")
    feats = _unit_length(_features(dets, det_path), det_path)
    order = np.argsort(det_image, kind="stable")
    data.detections = Detections(det_image[order], boxes[order], scores[order], feats[order])

    # Ground-truth boxes of the test images (detection metrics), in box order within an image.
    all_boxes = manifests.boxes
    box_lookup = _lookup(image_ids)
    box_image_ids = _column(all_boxes, "image_id", np.int64)
    in_range = (box_image_ids >= 0) & (box_image_ids < len(box_lookup))
    box_image = np.full(len(box_image_ids), -1, dtype=np.int64)
    box_image[in_range] = box_lookup[box_image_ids[in_range]]
    keep = np.flatnonzero(box_image >= 0)
    keep = keep[np.argsort(box_image[keep], kind="stable")]
    data.gt_image = box_image[keep]
    data.gt_boxes = _boxes(all_boxes)[keep]
    data.gt_labelled = _column(all_boxes, "person_id", np.int64)[keep] >= 0

    # Queries, in queries.parquet order; every one needs exactly one feature row.
    queries = manifests.queries
    data.query_ids = _column(queries, "query_id", np.int64)
    qimg = _column(queries, "image_id", np.int64)
    qidx = np.full(len(qimg), -1, dtype=np.int64)
    ok = (qimg >= 0) & (qimg < len(box_lookup))
    qidx[ok] = box_lookup[qimg[ok]]
    data.query_image = qidx
    all_names = dict(
        zip(
            images.column("image_id").to_pylist(),
            images.column("image_name").to_pylist(),
            strict=True,
        )
    )
    missing = [int(i) for i in qimg if int(i) not in all_names]
    if missing:
        raise PsearchError(
            f"{manifests.root}/queries.parquet: image_id {missing[0]} is not in images.parquet"
        )
    data.query_image_names = [all_names[int(i)] for i in qimg]
    data.query_boxes = _boxes(queries)
    data.occluded = _column(queries, "occluded", bool)
    data.low_resolution = _column(queries, "low_resolution", bool)
    data.query_features = _query_features(data.query_ids, query_feats, query_path)
    return data


def _query_features(query_ids: np.ndarray, table: pa.Table, path: Path) -> np.ndarray:
    feats = _unit_length(_features(table, path), path)
    ids = _column(table, "query_id", np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise PsearchError(f"{path}: query_id {int(unique[np.argmax(counts > 1)])} appears twice")
    known = np.isin(ids, query_ids)
    if not known.all():
        raise PsearchError(
            f"{path}: query_id {int(ids[np.argmax(~known)])} is not in the manifests"
        )
    present = np.isin(query_ids, ids)
    if not present.all():
        raise PsearchError(f"{path}: no feature for query_id {int(query_ids[np.argmax(~present)])}")
    position = _lookup(ids)
    return feats[position[query_ids]]
