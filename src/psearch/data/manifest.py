"""The manifests and detection files of docs/contract.md: schemas, atomic writing, checked reading.

Every stage reads and writes these tables through this module, so a column
that drifts from the contract fails loudly at the boundary, naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from psearch.atomic import atomic_file
from psearch.errors import PsearchError

MANIFEST_SCHEMAS: dict[str, pa.Schema] = {
    "images": pa.schema(
        [
            ("image_id", pa.int32()),
            ("image_name", pa.string()),
            ("path", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("split", pa.string()),
        ]
    ),
    "boxes": pa.schema(
        [
            ("box_id", pa.int64()),
            ("image_id", pa.int32()),
            ("x1", pa.float32()),
            ("y1", pa.float32()),
            ("x2", pa.float32()),
            ("y2", pa.float32()),
            ("person_id", pa.int32()),
            ("is_hard", pa.bool_()),
        ]
    ),
    "persons": pa.schema(
        [("person_id", pa.int32()), ("person_name", pa.string()), ("split", pa.string())]
    ),
    "queries": pa.schema(
        [
            ("query_id", pa.int32()),
            ("person_id", pa.int32()),
            ("image_id", pa.int32()),
            ("x1", pa.float32()),
            ("y1", pa.float32()),
            ("x2", pa.float32()),
            ("y2", pa.float32()),
            ("occluded", pa.bool_()),
            ("low_resolution", pa.bool_()),
        ]
    ),
    "galleries": pa.schema(
        [
            ("gallery_size", pa.int32()),
            ("query_id", pa.int32()),
            ("image_id", pa.int32()),
            ("gt_x1", pa.float32()),
            ("gt_y1", pa.float32()),
            ("gt_x2", pa.float32()),
            ("gt_y2", pa.float32()),
        ]
    ),
}

MANIFEST_TABLES = tuple(MANIFEST_SCHEMAS)
GALLERY_DETECTIONS = "gallery_detections.parquet"
QUERY_FEATURES = "query_features.parquet"


def gallery_detections_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int32()),
            ("x1", pa.float32()),
            ("y1", pa.float32()),
            ("x2", pa.float32()),
            ("y2", pa.float32()),
            ("score", pa.float32()),
            ("feature", pa.list_(pa.float32(), dim)),
        ]
    )


def query_features_schema(dim: int) -> pa.Schema:
    return pa.schema([("query_id", pa.int32()), ("feature", pa.list_(pa.float32(), dim))])


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Write a table atomically (temp file in the same directory, then rename)."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet file; when `schema` is given, check its columns and types (names the file)."""
    path = Path(path)
    if not path.is_file():
        raise PsearchError(f"{path}: file not found")
    try:
        # ParquetFile, not pq.read_table: the latter imports pyarrow.dataset and pandas (~1-2 s).
        with pq.ParquetFile(path) as parquet:
            table = parquet.read()
    except (OSError, pa.ArrowException) as exc:
        raise PsearchError(f"{path}: not a readable Parquet file ({exc})") from None
    if schema is not None:
        check_schema(table, schema, path)
        table = table.select(schema.names)
    return table


def check_schema(table: pa.Table, schema: pa.Schema, path: str | Path) -> None:
    for fld in schema:
        if fld.name not in table.schema.names:
            raise PsearchError(f"{path}: missing column {fld.name!r}")
        actual = table.schema.field(fld.name).type
        if actual != fld.type:
            raise PsearchError(
                f"{path}: column {fld.name!r} has type {actual}, expected {fld.type}"
            )


def feature_dim(table: pa.Table, path: str | Path) -> int:
    """D of a `feature` column that is fixed_size_list<float32>[D]."""
    if "feature" not in table.schema.names:
        raise PsearchError(f"{path}: missing column 'feature'")
    ftype = table.schema.field("feature").type
    if not pa.types.is_fixed_size_list(ftype) or ftype.value_type != pa.float32():
        raise PsearchError(
            f"{path}: column 'feature' has type {ftype}, expected fixed_size_list<float32>[D]"
        )
    return ftype.list_size


@dataclass
class Manifests:
    """All manifest tables of one dataset, as pyarrow tables, plus dataset.json."""

    root: Path
    images: pa.Table
    boxes: pa.Table
    persons: pa.Table
    queries: pa.Table
    galleries: pa.Table
    info: dict[str, Any]


def read_manifests(root: str | Path) -> Manifests:
    root = Path(root)
    if not root.is_dir():
        raise PsearchError(f"{root}: manifests directory not found")
    tables = {
        name: read_parquet(root / f"{name}.parquet", schema)
        for name, schema in MANIFEST_SCHEMAS.items()
    }
    info_path = root / "dataset.json"
    try:
        info = json.loads(info_path.read_text())
    except OSError:
        raise PsearchError(f"{info_path}: file not found") from None
    except ValueError:
        raise PsearchError(f"{info_path}: not valid JSON") from None
    return Manifests(root=root, info=info, **tables)
