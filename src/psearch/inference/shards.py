"""Shards of an extraction: which images a shard owns, where its part goes, and the merge.

Shard I of N takes every N-th test image starting at position I (in image_id order), and
likewise every N-th query image (the images holding queries), computing all queries of each
image it takes. Its output is a part directory `DETS/part-00I-of-00N/` holding the contract
files for its images and an extraction.json that records the shard and the settings. The merge
checks that the parts are exactly shards 0..N-1 of one N made with the same settings, then
interleaves them back into image_id order, streaming (memory does not grow with the gallery).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from psearch.data.manifest import (
    GALLERY_DETECTIONS,
    QUERY_FEATURES,
    check_schema,
    gallery_detections_schema,
    query_features_schema,
    read_parquet,
)
from psearch.errors import PsearchError
from psearch.inference.writer import (
    EXTRACTION_JSON,
    ROW_GROUP_ROWS,
    GalleryWriter,
    read_extraction_json,
    relative_path,
    write_extraction_json,
)

PART_PATTERN = "part-*-of-*"
# Entries of extraction.json that must agree between the parts of one extraction.
SETTINGS_KEYS = (
    "boxes",
    "features",
    "model",
    "idnet",
    "feat_dim",
    "data_version",
    "model_settings",
)
# Entries that describe one part only; the merged extraction.json sums or drops them.
PER_PART_KEYS = ("shard", "images", "queries", "seconds", "images_per_s", "device")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise PsearchError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 0 <= index < count:
        raise PsearchError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def part_dir(out: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    return Path(out) / f"part-{index:03d}-of-{count:03d}"


def shard_positions(length: int, shard: tuple[int, int] | None) -> range:
    """The positions (0..length-1) shard I/N owns: I, I+N, I+2N, ... (all without a shard)."""
    if shard is None:
        return range(length)
    index, count = shard
    return range(index, length, count)


# ---------------------------------------------------------------------------
# merge


def merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """Combine shard parts into `out`'s contract files; refuses gaps, overlaps and mixtures.

    With no parts given, merges every `out/part-*-of-*` directory. The parts are kept (a
    re-run of a sharded extraction skips them); the three files are staged in `out` and
    renamed into place together, so a failed merge leaves the previous files untouched.
    """
    out = Path(out)
    parts = [Path(p) for p in parts] or sorted(out.glob(PART_PATTERN))
    if not parts:
        raise PsearchError(f"{out}: no extraction parts ({PART_PATTERN}) to merge")
    infos = _check_parts(parts)
    ordered = [part for _, part in sorted((info["shard"][0], part) for part, info in infos.items())]
    first = infos[ordered[0]]
    dim = int(first["feat_dim"])
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merge-tmp-", dir=out))
    try:
        gallery_rows = _merge_gallery(ordered, staging / GALLERY_DETECTIONS, dim)
        queries = _merge_queries(ordered, staging / QUERY_FEATURES, dim)
        seconds = sum(float(infos[p].get("seconds", 0.0)) for p in ordered)
        images = sum(int(infos[p]["images"]) for p in ordered)
        merged = {k: v for k, v in first.items() if k not in PER_PART_KEYS}
        merged.update(
            images=images,
            queries=queries,
            detections=gallery_rows,
            seconds=round(seconds, 3),
            # Throughput of one worker: the parts may have run side by side.
            images_per_s=round(images / seconds, 3) if seconds > 0 else None,
            merged_parts=len(ordered),
        )
        for key in ("manifests", "image_root"):  # recorded relative to the part: now to `out`
            if merged.get(key):
                merged[key] = relative_path(ordered[0] / merged[key], out)
        write_extraction_json(staging, merged)  # without the timings: they stay in the parts
        for name in (GALLERY_DETECTIONS, QUERY_FEATURES, EXTRACTION_JSON):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return merged


def _check_parts(parts: list[Path]) -> dict[Path, dict[str, Any]]:
    """extraction.json of every part, checked to be exactly shards 0..N-1 of one extraction."""
    infos: dict[Path, dict[str, Any]] = {}
    for part in parts:
        if part in infos:
            raise PsearchError(f"{part}: given twice (overlapping shards)")
        info = read_extraction_json(part)
        shard = info.get("shard")
        if not (isinstance(shard, list) and len(shard) == 2):
            raise PsearchError(f"{part / EXTRACTION_JSON}: not a shard part (no 'shard': [I, N])")
        infos[part] = info
    counts = sorted({info["shard"][1] for info in infos.values()})
    if len(counts) > 1:
        raise PsearchError(f"parts come from different shard counts ({counts}): overlapping shards")
    count = counts[0]
    owner: dict[int, Path] = {}
    for part, info in infos.items():
        index = info["shard"][0]
        if index in owner:
            raise PsearchError(f"{part}: overlaps {owner[index]} (both are shard {index}/{count})")
        owner[index] = part
    missing = [f"{i}/{count}" for i in range(count) if i not in owner]
    if missing:
        raise PsearchError(f"missing shards {', '.join(missing)} (merge needs all {count} parts)")
    reference_part, reference = owner[0], infos[owner[0]]
    for part, info in infos.items():
        for key in SETTINGS_KEYS:
            if info.get(key) != reference.get(key):
                raise PsearchError(
                    f"{part}: {key} {info.get(key)!r} differs from {reference_part}'s "
                    f"{reference.get(key)!r} (parts of different extractions)"
                )
    return infos


def _image_groups(path: Path, dim: int, part: int) -> Iterator[tuple[int, int, pa.Table]]:
    """(image_id, part, rows) for each run of one image's rows in a part's gallery file."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise PsearchError(f"{path}: not a readable Parquet file ({exc})") from None
    check_schema(parquet.schema_arrow.empty_table(), gallery_detections_schema(dim), path)
    for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
        table = pa.Table.from_batches([batch]).select(gallery_detections_schema(dim).names)
        ids = table.column("image_id").to_numpy()
        bounds = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), len(ids)]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            yield int(ids[start]), part, table.slice(start, end - start)


def _merge_gallery(parts: list[Path], path: Path, dim: int) -> int:
    """k-way merge of the parts' gallery rows by image_id (each part is sorted already)."""
    streams = [_image_groups(p / GALLERY_DETECTIONS, dim, i) for i, p in enumerate(parts)]
    last: tuple[int, int] | None = None
    with contextlib.closing(GalleryWriter(path, dim)) as writer:
        for image_id, part, rows in heapq.merge(*streams, key=lambda group: group[0]):
            if last is not None and image_id == last[0] and part != last[1]:
                raise PsearchError(
                    f"image_id {image_id} is in both {parts[last[1]]} and {parts[part]} "
                    "(overlapping shards)"
                )
            if last is not None and image_id < last[0]:
                raise PsearchError(
                    f"{parts[part] / GALLERY_DETECTIONS}: rows not in image_id order"
                )
            last = (image_id, part)
            writer.add_table(rows)
        return writer.rows


def _merge_queries(parts: list[Path], path: Path, dim: int) -> int:
    """All parts' query features, sorted by query_id (they are small: one row per query)."""
    tables = [read_parquet(p / QUERY_FEATURES, query_features_schema(dim)) for p in parts]
    table = pa.concat_tables(tables)
    ids = table.column("query_id").to_numpy()
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise PsearchError(f"query_id {int(unique[counts > 1][0])} is in more than one part")
    table = table.take(np.argsort(ids, kind="stable"))
    pq.write_table(table, path)
    return table.num_rows
