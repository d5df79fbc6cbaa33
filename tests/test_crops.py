"""IDNet crops with context (psearch.imaging): geometry, pixels, fill outside the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psearch.imaging import IMAGE_MEAN, crop_size, cut_crops, inner_box


def scene() -> torch.Tensor:
    """uint8 [3, 120, 160]: grey, a red 40 x 20 "person" at x 60..80, y 40..80, smooth noise."""
    generator = torch.Generator().manual_seed(0)
    image = torch.full((3, 120, 160), 128.0)
    image += (
        40
        * torch.nn.functional.interpolate(
            torch.rand(1, 3, 12, 16, generator=generator), size=(120, 160), mode="bilinear"
        )[0]
    )
    image[:, 40:80, 60:80] = torch.tensor([230.0, 20.0, 20.0]).view(3, 1, 1)
    return image.round().to(torch.uint8)


def test_context_one_crop_is_the_box_resized():
    crops = cut_crops(scene(), [[60, 40, 80, 80]], (32, 16), 1.0)
    assert crops.shape == (1, 3, 32, 16) and crops.dtype == torch.float32
    # Bilinear sampling blends the outermost samples with the pixels just outside the box.
    expected = torch.tensor([230.0, 20.0, 20.0]).div(255).view(3, 1, 1).expand(3, 30, 14)
    torch.testing.assert_close(crops[0, :, 1:-1, 1:-1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("context", [1.5, 2.0])
def test_the_inner_box_of_a_context_crop_is_the_plain_crop(context):
    image, box = scene(), [[58.3, 37.9, 83.1, 81.6]]
    plain = cut_crops(image, box, (32, 16), 1.0)[0]
    wide = cut_crops(image, box, (32, 16), context)[0]
    assert wide.shape[1:] == crop_size((32, 16), context)
    x1, y1, x2, y2 = (round(v) for v in inner_box(*wide.shape[1:], context))
    assert (y2 - y1, x2 - x1) == (32, 16)
    torch.testing.assert_close(wide[:, y1:y2, x1:x2], plain, atol=1e-5, rtol=0)
    # ... and the context around it is the scene's, not the person's colour.
    assert wide[0, :y1].mean() < 0.7 < plain[0].mean()


def test_outside_the_image_is_the_normalisation_mean():
    crops = cut_crops(scene(), [[0, 0, 20, 40]], (40, 20), 2.0)  # top-left corner box
    fill = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    torch.testing.assert_close(crops[0, :, :15, :7], fill.expand(3, 15, 7), atol=1e-6, rtol=0)
    assert not torch.allclose(crops[0, :, 50:, 20:], fill.expand(3, 30, 20), atol=0.02)


def test_many_boxes_at_once_and_none():
    boxes = np.array([[60, 40, 80, 80], [10, 10, 30, 50]], np.float32)
    both = cut_crops(scene(), boxes, (32, 16), 1.5)
    assert both.shape == (2, 3, 48, 24)
    torch.testing.assert_close(both[1], cut_crops(scene(), boxes[1:], (32, 16), 1.5)[0])
    assert cut_crops(scene(), np.zeros((0, 4)), (32, 16), 1.5).shape == (0, 3, 48, 24)
