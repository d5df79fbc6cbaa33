"""The forward passes behind extract and search: decode in workers, batch, infer, keep order.

Images are decoded (uint8) in DataLoader workers and converted to float on the device. Batches
hold images of one padded size only (batching.py), so results do not depend on batch
neighbours. Each pass yields its results a chunk at a time, in the order of the input list.
`run_stream` is the same pass over images that arrive one by one (video frames, decoded by
the caller): consecutive images of one padded size share a batch, and only a batch is held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

from psearch.errors import PsearchError
from psearch.imaging import cut_crops
from psearch.inference.batching import padded_size, plan_batches

# Crops per IDNet forward pass.
CROP_BATCH = 256


class ImageFiles(Dataset):
    """(position, uint8 [3, H, W] RGB image or None, decode error or None) per path.

    A decode failure is returned, not raised, so the main process can name the file in a
    one-line error (an exception raised in a worker arrives wrapped in a traceback).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            return position, decode_image(str(self.paths[position]), mode=ImageReadMode.RGB), None
        except (RuntimeError, OSError, ValueError) as exc:
            return position, None, " ".join(str(exc).split()) or type(exc).__name__


def collate_items(items):
    return items


def amp_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (as training uses); plain float32 on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_keys(sizes: Sequence[tuple[int, int]], min_size: int, max_size: int) -> list:
    """The grouping key of each image: its padded size inside the joint net."""
    return [padded_size(h, w, min_size, max_size) for h, w in sizes]


def run_chunks(
    paths: Sequence[Path],
    keys: Sequence[Any],
    step: Callable[[list[int], list[torch.Tensor]], list[Any]],
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[list[tuple[int, Any]]]:
    """Run `step(positions, uint8 images on device)` over every path; yield each chunk's
    (position, result) pairs sorted by position."""
    plan = plan_batches(keys, batch_size)
    batches = [batch for chunk in plan for batch in chunk]
    loader = DataLoader(
        ImageFiles(paths),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_items,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    loaded = iter(loader)
    for chunk in plan:
        results: dict[int, Any] = {}
        for _ in chunk:
            items = next(loaded)
            for position, image, error in items:
                if image is None:
                    raise PsearchError(f"{paths[position]}: cannot decode image ({error})")
            positions = [position for position, _, _ in items]
            images = [image.to(device, non_blocking=True) for _, image, _ in items]
            results.update(zip(positions, step(positions, images), strict=True))
        yield sorted(results.items())


def run_stream(
    items: Iterable[tuple[Any, torch.Tensor]],
    step: Callable[[list[int], list[torch.Tensor]], list[Any]],
    batch_size: int,
    device: torch.device,
) -> Iterator[list[tuple[int, Any]]]:
    """Run `step` over (key, uint8 [3, H, W] image) pairs as they come; yield each batch's
    (position, result) pairs in order. A batch holds consecutive images with one key (their
    padded size), so, as in `run_chunks`, no result depends on its batch neighbours."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    positions: list[int] = []
    images: list[torch.Tensor] = []
    batch_key = None
    for position, (key, image) in enumerate(items):
        if images and (key != batch_key or len(images) == batch_size):
            yield list(zip(positions, step(positions, images), strict=True))
            positions, images = [], []
        batch_key = key
        positions.append(position)
        images.append(image.to(device, non_blocking=True))
    if images:
        yield list(zip(positions, step(positions, images), strict=True))


def as_float(images: list[torch.Tensor]) -> list[torch.Tensor]:
    return [image.float().div_(255.0) for image in images]


def detect_step(model, amp: bool) -> Callable:
    """Joint net forward: (boxes [K,4], scores [K], features [K,D]) numpy per image."""

    def step(positions: list[int], images: list[torch.Tensor]):
        device = images[0].device
        with torch.inference_mode(), amp_context(device, amp):
            outputs = model(as_float(images))
        return [
            (
                out["boxes"].float().cpu().numpy(),
                out["scores"].float().cpu().numpy(),
                out["features"].float().cpu().numpy(),
            )
            for out in outputs
        ]

    return step


def box_feature_step(model, boxes: Sequence[np.ndarray], amp: bool) -> Callable:
    """Joint net features of given boxes (boxes[position], pixels) instead of detections."""

    def step(positions: list[int], images: list[torch.Tensor]):
        device = images[0].device
        given = [torch.as_tensor(boxes[p], dtype=torch.float32, device=device) for p in positions]
        with torch.inference_mode(), amp_context(device, amp):
            features = model.query_features(as_float(images), given)
        return [f.float().cpu().numpy() for f in features]

    return step


def idnet_features(
    idnet, image: torch.Tensor, boxes: np.ndarray, crop_size: tuple[int, int], amp: bool
) -> np.ndarray:
    """[K, D] IDNet features of the boxes cropped from one uint8 image, as IDNet was trained."""
    crops = cut_crops(image, boxes, crop_size, idnet.context)
    out = []
    with torch.inference_mode(), amp_context(image.device, amp):
        for start in range(0, len(crops), CROP_BATCH):
            out.append(idnet.features(crops[start : start + CROP_BATCH]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, idnet.feat_dim), np.float32)


def idnet_box_step(idnet, boxes: Sequence[np.ndarray], crop_size, amp: bool) -> Callable:
    """IDNet features of given boxes (boxes[position])."""

    def step(positions: list[int], images: list[torch.Tensor]):
        return [
            idnet_features(idnet, image, boxes[p], crop_size, amp)
            for p, image in zip(positions, images, strict=True)
        ]

    return step


def detect_idnet_step(model, idnet, crop_size, amp: bool) -> Callable:
    """Deep + IDNet: the joint net's detections, re-id features from IDNet crops of them."""
    detect = detect_step(model, amp)

    def step(positions: list[int], images: list[torch.Tensor]):
        detections = detect(positions, images)
        return [
            (boxes, scores, idnet_features(idnet, image, boxes, crop_size, amp))
            for (boxes, scores, _), image in zip(detections, images, strict=True)
        ]

    return step
