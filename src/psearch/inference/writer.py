"""Streaming writers for the extraction files (docs/contract.md schemas), and extraction.json.

Gallery rows are buffered up to ROW_GROUP_ROWS and written as one Parquet row group, so memory
stays flat however large the gallery is. The files are written inside a temporary output
directory (psearch.atomic.atomic_dir), which is renamed into place only when the run succeeds.

extraction.json records the same bytes for the same extraction wherever and whenever it runs
(so a DVC output hashes alike on every run): paths relative to the extraction directory, and
no timings (TIMING_KEYS go to MLflow and the printed summary; a shard's part keeps them, as
the merge sums them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from psearch.data.manifest import gallery_detections_schema, query_features_schema
from psearch.jsonfile import read_json_object

EXTRACTION_JSON = "extraction.json"
# What an extraction returns and logs but its extraction.json (unsharded) leaves out.
TIMING_KEYS = ("seconds", "images_per_s", "query_seconds")
# About 20 MB of 256-d features per row group: large enough to read fast, small to hold.
ROW_GROUP_ROWS = 20_000


def feature_array(features: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    """[N, D] float32 -> fixed_size_list<float32>[D] without copying row by row."""
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def gallery_table(
    image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray, features: np.ndarray, dim: int
) -> pa.Table:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    columns = [
        pa.array(np.asarray(image_ids, np.int32)),
        *(pa.array(boxes[:, i]) for i in range(4)),
        pa.array(np.asarray(scores, np.float32)),
        feature_array(features, dim),
    ]
    return pa.Table.from_arrays(columns, schema=gallery_detections_schema(dim))


def query_table(query_ids: np.ndarray, features: np.ndarray, dim: int) -> pa.Table:
    columns = [pa.array(np.asarray(query_ids, np.int32)), feature_array(features, dim)]
    return pa.Table.from_arrays(columns, schema=query_features_schema(dim))


class GalleryWriter:
    """Append one image's detections at a time; rows reach the file in the order appended."""

    def __init__(self, path: Path, dim: int) -> None:
        self.dim = dim
        self.rows = 0
        self._writer = pq.ParquetWriter(path, gallery_detections_schema(dim))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, image_id: int, boxes: np.ndarray, scores: np.ndarray, features: np.ndarray):
        if features.shape[1:] != (self.dim,):
            raise ValueError(f"features of shape {features.shape}, expected [N, {self.dim}]")
        ids = np.full(len(scores), image_id, np.int32)
        self.add_table(gallery_table(ids, boxes, scores, features, self.dim))

    def add_table(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_query_features(path: Path, results: dict[int, np.ndarray], dim: int) -> int:
    """query_features.parquet from {query_id: [D] feature}, sorted by query_id."""
    ids = np.array(sorted(results), np.int32)
    features = np.stack([results[q] for q in ids]) if len(ids) else np.zeros((0, dim), np.float32)
    pq.write_table(query_table(ids, features, dim), path)
    return len(ids)


def read_extraction_json(directory: Path) -> dict[str, Any]:
    return read_json_object(
        Path(directory) / EXTRACTION_JSON, missing="file not found (not an extraction output)"
    )


def write_extraction_json(directory: Path, info: dict[str, Any], timings: bool = False) -> None:
    """Write `info` as extraction.json, without TIMING_KEYS unless `timings` (a shard's part)."""
    record = {k: v for k, v in info.items() if timings or k not in TIMING_KEYS}
    (Path(directory) / EXTRACTION_JSON).write_text(json.dumps(record, indent=2) + "\n")


def relative_path(path: Path | str, directory: Path) -> str:
    """`path` as seen from `directory` (both resolved), as extraction.json records paths."""
    return os.path.relpath(Path(path).resolve(), Path(directory).resolve())


def recorded_manifests(directory: Path, info: dict[str, Any], override: Path | None) -> Path:
    """The manifests an extraction was made from: `override`, else extraction.json's
    `manifests`, relative to the extraction directory (absolute in older files)."""
    if override:
        return Path(override)
    recorded = info.get("manifests")
    return (Path(directory) / recorded).resolve() if recorded else Path("")
