"""Images and boxes shared by data and models: normalisation constants and IDNet crops.

``IMAGE_MEAN`` / ``IMAGE_STD`` are the normalisation every torchvision ImageNet model expects;
the joint net and IDNet normalise with them, and crops are filled with the mean outside the
image. ``cut_crops`` cuts the crops IDNet sees: for pretraining (``data.loaders.CropDataset``),
for the Deep + IDNet baseline (`psearch extract --features idnet`) and for the MLflow pyfunc,
so the three agree; ``inner_box`` is where the person lies inside such a crop (IDNet pools it).

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

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


def hflip_boxes(boxes: torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """[k, 4] x1, y1, x2, y2 boxes of an image `width` pixels wide, mirrored left to right
    (`width` may be a tensor: the exported graph traces it)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


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
    # Only the window the crops sample is converted to float, not the whole image: 2 px
    # beyond the regions covers every bilinear neighbour, so a window edge inside the image
    # is never read and the crops are the whole image's (to float rounding).
    height, width = image.shape[-2:]
    x0 = min(max(int(regions[:, 0].min().floor()) - 2, 0), width - 1)
    y0 = min(max(int(regions[:, 1].min().floor()) - 2, 0), height - 1)
    x1 = max(min(int(regions[:, 2].max().ceil()) + 2, width), x0 + 1)
    y1 = max(min(int(regions[:, 3].max().ceil()) + 2, height), y0 + 1)
    regions = regions - regions.new_tensor([x0, y0, x0, y0])
    fill = torch.tensor(IMAGE_MEAN, device=image.device).view(1, 3, 1, 1)
    # RoIAlign reads zero outside the image: centre on the fill colour so that is the fill.
    shifted = image[None, :, y0:y1, x0:x1].float().div(255.0) - fill
    crops = roi_align(shifted, [regions], out_size, spatial_scale=1.0, aligned=True)
    return (crops + fill).clamp_(0.0, 1.0)
