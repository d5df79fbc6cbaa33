"""`psearch ingest`: a raw CUHK-SYSU or PRW dataset, or a table of boxes -> the manifests of docs/contract.md.

The reader of the format produces a `ParsedDataset`; this module decodes each
image (its size, and proof that it is readable), converts `[x y w h]` to
`x1 y1 x2 y2`, builds the five Parquet tables with the contract's schemas and
writes them, with dataset.json, into the output directory atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from psearch.atomic import atomic_dir, check_writable
from psearch.data.cuhk_sysu import read_cuhk_sysu
from psearch.data.manifest import MANIFEST_SCHEMAS, write_parquet
from psearch.data.prw import read_prw
from psearch.data.records import ParsedDataset, inside_root
from psearch.data.table import TableOptions, read_table
from psearch.diskspace import SMALL, check_free_space
from psearch.errors import PsearchError

FORMATS = ("cuhk-sysu", "prw", "table")


def ingest(
    root: Path,
    out: Path,
    fmt: str,
    table: TableOptions | None = None,
    absolute_root: bool = False,
) -> dict[str, Any]:
    """Read the dataset at `root` in format `fmt`; write the manifests directory `out`.

    Format `table` reads `table.annotations` (psearch.data.table) instead of a layout.
    dataset.json names the dataset root relative to `out`, so the same data gives the same
    bytes wherever the checkout is (a DVC output); `absolute_root` adds `root_abs` too, for
    a pipeline that mounts the manifests elsewhere than it wrote them (Kubeflow)."""
    root, out = Path(root), Path(out)
    if fmt not in FORMATS:
        raise PsearchError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise PsearchError(f"{root}: dataset root not found")
    if fmt == "table" and table is None:
        raise PsearchError("format table needs --annotations FILE.csv|FILE.parquet")
    check_writable(out)  # before the annotations and every image are read
    check_free_space({out: SMALL})  # tables of boxes: small beside the images they describe
    parsed = read_table(root, table) if fmt == "table" else _read(root, fmt)
    # Hashing gigabytes of annotation files overlaps the rest (hashlib releases the GIL).
    with ThreadPoolExecutor(1) as pool:
        digest = pool.submit(content_hash, parsed.annotation_files, root)
        sizes = image_sizes(root, parsed.image_paths)
        check_boxes_fit(parsed, sizes)
        tables = {**build_tables(parsed, sizes), **parsed.extra_tables}
        info = dataset_info(parsed, tables, digest.result())
    # Where images.path is relative to, relative to the manifests (psearch.data.loaders.dataset_root).
    info["root"] = os.path.relpath(root.resolve(), out.resolve())
    if absolute_root:  # a pipeline may mount the manifests elsewhere than ingest wrote them
        info["root_abs"] = str(root.resolve())
    with atomic_dir(out) as tmp:
        for name, table in tables.items():
            write_parquet(table, tmp / f"{name}.parquet")
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _read(root: Path, fmt: str) -> ParsedDataset:
    if fmt == "cuhk-sysu":
        return read_cuhk_sysu(root)
    return read_prw(root)


def image_sizes(root: Path, paths: list[str]) -> np.ndarray:
    """(n, 2) width, height of each image, every one decoded in full (threads: Pillow
    releases the GIL), so a truncated or corrupt file fails here and not mid-training."""
    for rel in paths:
        if inside_root(rel) is None:  # the readers refuse these; this guards any new one
            raise PsearchError(f"{root}: image path {rel!r} leads outside the dataset root")
    sizes = np.empty((len(paths), 2), dtype=np.int32)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        # map() yields in order, so the first bad image in annotation order is the one named.
        for i, size in enumerate(pool.map(_decoded_size, (root / rel for rel in paths))):
            sizes[i] = size
    return sizes


def check_boxes_fit(p: ParsedDataset, sizes: np.ndarray) -> None:
    """Every box and query box overlaps its image and is at most twice its size (a box
    entirely outside, or 10^9 px wide, is an annotation error, not a person)."""
    for what, image, xywh in (
        ("box", p.box_image, p.box_xywh),
        ("query box", p.query_image, p.query_xywh),
    ):
        if len(xywh) == 0:
            continue
        width, height = sizes[image, 0].astype(np.float64), sizes[image, 1].astype(np.float64)
        x, y, w, h = (xywh[:, k] for k in range(4))
        outside = (x >= width) | (y >= height) | (x + w <= 0) | (y + h <= 0)
        too_big = (w > 2 * width) | (h > 2 * height)
        bad = outside | too_big
        if bad.any():
            k = int(np.argmax(bad))
            i = int(image[k])
            problem = "lies outside" if outside[k] else "is more than twice the size of"
            box = " ".join(f"{v:g}" for v in xywh[k])
            raise PsearchError(
                f"{p.image_paths[i]}: {what} [{box}] (x y w h) {problem} the "
                f"{int(width[k])}x{int(height[k])} image"
            )


def _decoded_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            size = img.size
            # A JPEG decodes at 1/8 scale: its whole compressed stream is still read (so a
            # truncated one fails), at half the cost of full size. Other formats ignore this.
            img.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except FileNotFoundError:
        raise PsearchError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PsearchError(f"{path}: not a decodable image ({_reason(exc)})") from None
    return size


def _reason(exc: Exception) -> str:
    """Why Pillow could not decode a file (its own message repeats the path: left out)."""
    text = "" if isinstance(exc, UnidentifiedImageError) else " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


def _corners(xywh: np.ndarray) -> list[pa.Array]:
    """x1, y1, x2, y2 float32 columns; NaN rows (absent gt boxes) become nulls."""
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    missing = np.isnan(xyxy[:, 0])
    return [
        pa.array(xyxy[:, k], type=pa.float32(), mask=missing if missing.any() else None)
        for k in range(4)
    ]


def build_tables(p: ParsedDataset, sizes: np.ndarray) -> dict[str, pa.Table]:
    n_images = len(p.image_names)
    images = [
        pa.array(np.arange(n_images, dtype=np.int32)),
        pa.array(p.image_names, type=pa.string()),
        pa.array(p.image_paths, type=pa.string()),
        pa.array(sizes[:, 0]),
        pa.array(sizes[:, 1]),
        pa.array(p.image_splits, type=pa.string()),
    ]
    boxes = [
        pa.array(np.arange(len(p.box_image), dtype=np.int64)),
        pa.array(p.box_image.astype(np.int32)),
        *_corners(p.box_xywh),
        pa.array(p.box_person.astype(np.int32)),
        pa.array(p.box_hard.astype(bool)),
    ]
    persons = [
        pa.array(np.arange(len(p.person_names), dtype=np.int32)),
        pa.array(p.person_names, type=pa.string()),
        pa.array(p.person_splits, type=pa.string()),
    ]
    queries = [
        pa.array(np.arange(len(p.query_person), dtype=np.int32)),
        pa.array(p.query_person.astype(np.int32)),
        pa.array(p.query_image.astype(np.int32)),
        *_corners(p.query_xywh),
        pa.array(p.query_occluded.astype(bool)),
        pa.array(p.query_low_resolution.astype(bool)),
    ]
    gallery_parts = []
    for g in sorted(p.galleries, key=lambda g: g.size):
        cols = [
            pa.array(np.full(len(g.query), g.size, dtype=np.int32)),
            pa.array(g.query),
            pa.array(g.image),
            *_corners(g.gt),
        ]
        gallery_parts.append(pa.Table.from_arrays(cols, schema=MANIFEST_SCHEMAS["galleries"]))
    galleries = (
        pa.concat_tables(gallery_parts)
        if gallery_parts
        else MANIFEST_SCHEMAS["galleries"].empty_table()
    )
    return {
        "images": pa.Table.from_arrays(images, schema=MANIFEST_SCHEMAS["images"]),
        "boxes": pa.Table.from_arrays(boxes, schema=MANIFEST_SCHEMAS["boxes"]),
        "persons": pa.Table.from_arrays(persons, schema=MANIFEST_SCHEMAS["persons"]),
        "queries": pa.Table.from_arrays(queries, schema=MANIFEST_SCHEMAS["queries"]),
        "galleries": galleries,
    }


def content_hash(files: list[Path], root: Path) -> str:
    """sha256 over the annotation files (relative path and bytes, in path order)."""
    digest = hashlib.sha256()

    # An annotation table may live outside the root: it then counts by its file name.
    def name(f: Path) -> str:
        return f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name

    for path in sorted(files, key=name):
        digest.update(name(path).encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def dataset_info(p: ParsedDataset, tables: dict[str, pa.Table], digest: str) -> dict[str, Any]:
    counts: dict[str, int] = {name: t.num_rows for name, t in tables.items()}
    counts["labelled_boxes"] = int((p.box_person >= 0).sum())
    counts["train_images"] = p.image_splits.count("train")
    counts["test_images"] = p.image_splits.count("test")
    counts["train_persons"] = p.person_splits.count("train")
    counts["test_persons"] = p.person_splits.count("test")
    counts["dropped_zero_size_boxes"] = int(p.info.get("dropped_zero_size_boxes", 0))
    extra = {k: v for k, v in p.info.items() if k != "dropped_zero_size_boxes"}
    return {
        "name": p.name,
        "format": p.format,
        "counts": counts,
        "content_hash": digest,
        "annotation_files": len(p.annotation_files),
        "gallery_sizes": sorted(g.size for g in p.galleries),
        **extra,
    }
