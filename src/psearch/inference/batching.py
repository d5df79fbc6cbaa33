"""Batches whose results do not depend on which images share them.

torchvision's GeneralizedRCNNTransform pads every image of a batch to the batch's largest
(resized) size; the padding changes the trunk's features near the right and bottom borders,
so an image's detections would depend on its neighbours in the batch, and a sharded run would
differ from a single one. Batching only images with the same padded size avoids that: each
image then sees exactly the input it would see alone.

To keep the output in image order without holding a whole gallery in memory, the work is cut
into chunks of consecutive images; inside a chunk, images are grouped by padded size.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

# Images per chunk: bounds the results held before they are written in order.
CHUNK_IMAGES = 256
SIZE_DIVISIBLE = 32  # JointNet's GeneralizedRCNNTransform(size_divisible=32)


def padded_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (H, W) the joint net's transform pads an image of this size to.

    The same arithmetic as torchvision's `_resize_image_and_masks` (eager mode) and
    `batch_images`: scale the shorter side to `min_size` unless the longer side would pass
    `max_size`, floor, then round each side up to a multiple of 32.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min(min_size / min(height, width), max_size / max(height, width))
    resized = (math.floor(float(height) * scale), math.floor(float(width) * scale))
    return tuple(math.ceil(side / SIZE_DIVISIBLE) * SIZE_DIVISIBLE for side in resized)


def plan_batches(
    keys: Sequence[Hashable], batch_size: int, chunk_size: int = CHUNK_IMAGES
) -> list[list[list[int]]]:
    """Chunks of consecutive positions, each split into batches of positions sharing a key.

    Every position 0..len(keys)-1 appears exactly once; batches hold at most `batch_size`
    positions, in increasing order; groups follow the first appearance of their key.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunks = []
    for start in range(0, len(keys), chunk_size):
        groups: dict[Hashable, list[int]] = {}
        for position in range(start, min(start + chunk_size, len(keys))):
            groups.setdefault(keys[position], []).append(position)
        chunks.append(
            [
                group[i : i + batch_size]
                for group in groups.values()
                for i in range(0, len(group), batch_size)
            ]
        )
    return chunks
