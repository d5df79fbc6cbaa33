"""IDNet crops: a person box with some context around it, resized to a fixed size.

One function cuts crops for pretraining (CropDataset), for the Deep + IDNet baseline
(`psearch extract --features idnet`) and for the MLflow pyfunc, so the three agree.

Why context: in the joint net a person's RoI is pooled from a scene feature map whose cells
near the box also see the people and clutter around it, while a tight crop sees zero padding
there. A crop spanning ``context`` times the box (centred on it), whose IDNet pools only the
box's own region, gives IDNet the features the joint net will pool, so its weights transfer.
Outside the image the crop is filled with the normalisation mean, which is what the joint
net's zero padding of normalised images amounts to.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

from psearch.models.backbones import IMAGE_MEAN


def crop_size(size: tuple[int, int], context: float) -> tuple[int, int]:
    """(height, width) of a crop whose inner person box is resized to ``size``."""
    return round(size[0] * context), round(size[1] * context)


def inner_box(height: int, width: int, context: float) -> list[float]:
    """The person box's [x1, y1, x2, y2] inside a crop of ``height`` x ``width`` pixels."""
    h, w = height / context, width / context
    return [(width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2]


def cut_crops(
    image: torch.Tensor, boxes: np.ndarray | torch.Tensor, size: tuple[int, int], context: float
) -> torch.Tensor:
    """[K, 3, H, W] float crops in 0..1 of a uint8 [3, h, w] image; (H, W) = crop_size(size).

    Each crop spans ``context`` times its box around the box's centre. Bilinear RoIAlign
    with adaptive sampling (several samples per output pixel when shrinking) resizes.
    """
    boxes = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=image.device)
    out_size = crop_size(size, context)
    if len(boxes) == 0:
        return torch.zeros((0, 3, *out_size), device=image.device)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0) * (context / 2)
    regions = torch.cat([centre - half, centre + half], dim=1)
    fill = torch.tensor(IMAGE_MEAN, device=image.device).view(1, 3, 1, 1)
    # RoIAlign reads zero outside the image: centre on the fill colour so that is the fill.
    shifted = image[None].float().div(255.0) - fill
    crops = roi_align(shifted, [regions], out_size, spatial_scale=1.0, aligned=True)
    return (crops + fill).clamp_(0.0, 1.0)
