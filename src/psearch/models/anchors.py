"""Anchor coverage: how well a proposal network's anchors fit a dataset's ground-truth boxes.

`anchor_coverage` answers "could the RPN match these people at all?" before any training: it
resizes each image and its boxes exactly as the joint net's GeneralizedRCNNTransform does
(shorter side to min_size, longer side capped at max_size, padded to a multiple of 32), lays
torchvision's AnchorGenerator anchors (sizes x aspect ratios, ratio = height / width) on the
stride grid of the padded image, and reports the share of boxes whose best anchor IoU reaches
0.7 (the RPN's positive threshold) and 0.5. The anchors are built once per distinct image
size and boxes are matched against them in fixed-size chunks, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import box_iou

from psearch.imaging import IMAGE_MEAN, IMAGE_STD

POSITIVE_IOU = 0.7  # the RPN's foreground threshold
LOOSE_IOU = 0.5
IOU_CHUNK = 128  # boxes per box_iou call: ~10 MB per 20k anchors, whatever the dataset size


def anchor_coverage(
    boxes_per_image: Sequence[np.ndarray],
    image_sizes: Sequence[tuple[int, int]],
    *,
    min_size: int,
    max_size: int,
    anchor_sizes: Sequence[int],
    anchor_ratios: Sequence[float],
    stride: int = 16,
) -> dict[str, float | int]:
    """Coverage of `boxes_per_image` ((n, 4) x1 y1 x2 y2 in original pixels, one array per image
    of (width, height) `image_sizes`) by the anchors: box count, shares of boxes whose best IoU
    with any anchor is >= 0.7 and >= 0.5, and the median best IoU."""
    if len(boxes_per_image) != len(image_sizes):
        raise ValueError(f"{len(boxes_per_image)} box arrays for {len(image_sizes)} image sizes")
    transform = GeneralizedRCNNTransform(
        min_size, max_size, IMAGE_MEAN, IMAGE_STD, size_divisible=32
    )
    generator = AnchorGenerator(
        sizes=(tuple(anchor_sizes),), aspect_ratios=(tuple(float(r) for r in anchor_ratios),)
    )
    # Boxes are scaled image by image, then matched per image size in chunks: the anchors
    # depend only on the size, and one box_iou over many boxes beats hundreds of small ones.
    per_size: dict[tuple[int, int], tuple[tuple[int, int], torch.Tensor]] = {}
    scaled: dict[tuple[int, int], list[torch.Tensor]] = {}
    for boxes, (width, height) in zip(boxes_per_image, image_sizes, strict=True):
        boxes = torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        if len(boxes) == 0:
            continue
        key = (int(width), int(height))
        if key not in per_size:
            per_size[key] = _resized_anchors(transform, generator, *key, stride)
        scaled.setdefault(key, []).append(resize_boxes(boxes, (key[1], key[0]), per_size[key][0]))
    best: list[torch.Tensor] = []
    for key, chunks in scaled.items():
        anchors = per_size[key][1]
        for chunk in torch.cat(chunks).split(IOU_CHUNK):
            best.append(box_iou(chunk, anchors).max(dim=1).values)
    ious = torch.cat(best) if best else torch.zeros(0)
    n = len(ious)
    return {
        "boxes": n,
        "covered_iou_0.7": float((ious >= POSITIVE_IOU).float().mean()) if n else 0.0,
        "covered_iou_0.5": float((ious >= LOOSE_IOU).float().mean()) if n else 0.0,
        "median_best_iou": float(ious.median()) if n else 0.0,
    }


def _resized_anchors(
    transform: GeneralizedRCNNTransform,
    generator: AnchorGenerator,
    width: int,
    height: int,
    stride: int,
) -> tuple[tuple[int, int], torch.Tensor]:
    """(resized (h, w), anchors in resized-image pixels) for one original image size, from the
    transform itself (its resize rounding and padding) on a blank image."""
    with torch.no_grad():
        images, _ = transform.eval()([torch.zeros(3, height, width)])
    padded_h, padded_w = images.tensors.shape[-2:]
    grid = torch.empty(1, 1, padded_h // stride, padded_w // stride)
    anchors = generator(images, [grid])[0]
    return images.image_sizes[0], anchors
