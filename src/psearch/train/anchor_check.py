"""Anchor coverage of a dataset's training boxes: the manifests side of models.anchors.

`split_boxes` turns the manifests' images and boxes tables into the per-image box arrays and
(width, height) sizes that `psearch.models.anchors.anchor_coverage` takes; `manifest_coverage`
runs it on one split with the joint net's anchor and resize settings as keyword arguments.
"""

from __future__ import annotations

import numpy as np

from psearch.data.manifest import Manifests
from psearch.models.anchors import anchor_coverage


def split_boxes(
    manifests: Manifests, split: str = "train"
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """(x1 y1 x2 y2 boxes per image, (width, height) per image) for the images of `split`."""
    images = manifests.images
    in_split = np.asarray(images.column("split").to_pylist()) == split
    image_ids = images.column("image_id").to_numpy()[in_split]
    widths = images.column("width").to_numpy()[in_split]
    heights = images.column("height").to_numpy()[in_split]
    boxes = manifests.boxes
    owner = boxes.column("image_id").to_numpy()
    coords = np.stack([boxes.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
    order = np.argsort(owner, kind="stable")
    owner, coords = owner[order], coords[order]
    starts = np.searchsorted(owner, image_ids, side="left")
    ends = np.searchsorted(owner, image_ids, side="right")
    per_image = [coords[a:b] for a, b in zip(starts, ends, strict=True)]
    return per_image, [(int(w), int(h)) for w, h in zip(widths, heights, strict=True)]


def manifest_coverage(manifests: Manifests, split: str = "train", **anchors) -> dict:
    """`anchor_coverage` of `split`'s boxes; `anchors`: min_size, max_size, anchor_sizes,
    anchor_ratios (and optionally stride), as the joint net takes them."""
    per_image, sizes = split_boxes(manifests, split)
    return anchor_coverage(per_image, sizes, **anchors)
