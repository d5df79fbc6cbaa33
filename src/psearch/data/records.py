"""The in-memory form a dataset reader produces, before it becomes the manifest tables.

Readers (CUHK-SYSU, PRW) fill a `ParsedDataset` with names and `[x y w h]`
boxes in the dataset's own terms; `ingest` turns it into the Parquet tables.
Boxes live in numpy arrays because CUHK-SYSU's galleries alone hold 22 million
entries.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psearch.errors import PsearchError


@dataclass
class Gallery:
    """One protocol: rows (query, image, gt box or NaNs when the image lacks the person)."""

    size: int
    query: np.ndarray  # int32
    image: np.ndarray  # int32, index into ParsedDataset.image_names
    gt: np.ndarray  # float64 (n, 4) [x y w h], NaN rows where absent


@dataclass
class ParsedDataset:
    name: str
    format: str
    image_names: list[str]
    image_paths: list[str]  # relative to the dataset root
    image_splits: list[str]
    box_image: np.ndarray  # int32
    box_xywh: np.ndarray  # float64 (n, 4)
    box_person: np.ndarray  # int32, -1 unlabelled
    box_hard: np.ndarray  # bool
    person_names: list[str]
    person_splits: list[str]
    query_person: np.ndarray  # int32
    query_image: np.ndarray  # int32
    query_xywh: np.ndarray  # float64 (q, 4)
    query_occluded: np.ndarray  # bool
    query_low_resolution: np.ndarray  # bool
    galleries: list[Gallery]
    annotation_files: list[Path]
    info: dict[str, Any] = field(default_factory=dict)  # extra dataset.json entries
    # Tables beyond the five manifests (pyarrow tables by file stem), e.g. the table
    # format's image_meta (camera, frame time per image).
    extra_tables: dict[str, Any] = field(default_factory=dict)


def low_resolution_mask(heights: np.ndarray) -> np.ndarray:
    """docs/data.md's derived subset: the round-half-up 10 % smallest query boxes by height,
    ties to the lower query id."""
    count = int(np.floor(len(heights) * 0.1 + 0.5))
    order = np.lexsort((np.arange(len(heights)), heights))
    mask = np.zeros(len(heights), dtype=bool)
    mask[order[:count]] = True
    return mask


def inside_root(raw: str) -> str | None:
    """`raw`, a path relative to the dataset root (`/` or `\\` separated), normalised; None
    when it is absolute or climbs out of the root (`../x.jpg`, `a/../../x.jpg`).

    Annotation files are not trusted, so no path they name may reach outside the dataset.
    The check is on the name, not the resolved file: a symlink the dataset's owner put
    inside the root (an image directory on another disk, say) is followed deliberately.
    """
    path = posixpath.normpath(raw.replace("\\", "/"))
    if not raw or "\0" in raw or posixpath.isabs(path) or path in (".", ".."):
        return None
    return None if path.startswith("../") else path


def plain_file_name(name: str, where: str) -> str:
    """`name` when it is a bare file name; else a one-line error naming the annotation entry
    `where` (a directory part in an image name could lead outside the dataset root)."""
    if inside_root(name) != name or "/" in name or "\\" in name:
        raise PsearchError(f"{where}: {name!r} is not a file name inside the dataset root")
    return name
