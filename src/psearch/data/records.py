"""The in-memory form a dataset reader produces, before it becomes the manifest tables.

Readers (CUHK-SYSU, PRW) fill a `ParsedDataset` with names and `[x y w h]`
boxes in the dataset's own terms; `ingest` turns it into the Parquet tables.
Boxes live in numpy arrays because CUHK-SYSU's galleries alone hold 22 million
entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


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
