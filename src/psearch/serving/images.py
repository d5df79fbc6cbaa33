"""Images for the search service: decoding uploads safely, reading gallery images, cutting crops.

Uploads are checked from their header (format, size) before any pixel is decoded, so a
malformed or gigantic file is a 4xx, never a crash. Pixels are decoded by torchvision, the
decoder `psearch extract` used, so a gallery image searched from the page gives the features
its extraction gave; a video gallery's frames are decoded from their video by PyAV, as
`psearch extract --video` decoded them.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from psearch.inference.index import GalleryImage
from psearch.inference.video import read_frame

# An upload larger than this (bytes) is refused with 413; so is one above MAX_PIXELS.
MAX_UPLOAD_BYTES = 16 * 1024 * 1024
MAX_PIXELS = 40_000_000
CROP_HEIGHT = 160  # rendered crops are this tall (width follows the box)


class BadImage(ValueError):
    """An upload that is not a usable image; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header; BadImage when it is not an image or too large."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadImage(f"image of {len(data)} bytes: larger than {MAX_UPLOAD_BYTES}", 413)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadImage("not an image (PNG, JPEG, WebP, GIF or BMP expected)") from None
    if width < 1 or height < 1:
        raise BadImage(f"image of {width}x{height} pixels: empty")
    if width * height > MAX_PIXELS:
        raise BadImage(f"image of {width}x{height} pixels: more than {MAX_PIXELS} pixels", 413)
    return width, height


def decode_upload(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] RGB of an uploaded file (header checked first)."""
    width, height = image_size(data)
    try:
        if data[:2] == b"BM":  # torchvision does not decode BMP
            raise RuntimeError("bmp")
        image = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
        )
    except RuntimeError:
        image = _decode_with_pil(data)
    if tuple(image.shape[1:]) != (height, width):
        raise BadImage("image header and pixels disagree on its size")
    return image


def _decode_with_pil(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadImage("image data is corrupt (the header reads, the pixels do not)") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def read_image(image: GalleryImage) -> torch.Tensor:
    """uint8 [3, H, W] RGB of a gallery image (a file or a video frame), decoded as
    `psearch extract` did."""
    if image.video is not None:
        pixels = read_frame(image.video, image.frame_index, image.time_s)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    return decode_image(str(image.path), mode=ImageReadMode.RGB)


def open_picture(image: GalleryImage) -> Image.Image:
    """A gallery image (a file or a video frame) as an RGB PIL image."""
    if image.video is not None:
        return Image.fromarray(read_frame(image.video, image.frame_index, image.time_s))
    with Image.open(image.path) as opened:
        return opened.convert("RGB")


def frame_jpeg(image: GalleryImage) -> bytes:
    """JPEG of a video frame of the gallery (there is no file to send)."""
    out = io.BytesIO()
    open_picture(image).save(out, "JPEG", quality=90)
    return out.getvalue()


def render_crop(image: GalleryImage, box: list[float], height: int = CROP_HEIGHT) -> bytes:
    """JPEG of the box (x1, y1, x2, y2) cut from a gallery image, `height` pixels tall."""
    with open_picture(image) as picture:
        x1, y1, x2, y2 = box
        x1, y1 = max(0, int(x1)), max(0, int(y1))
        x2 = min(picture.width, max(x1 + 1, round(x2)))
        y2 = min(picture.height, max(y1 + 1, round(y2)))
        crop = picture.crop((x1, y1, x2, y2))
    width = max(1, round(crop.width * height / crop.height))
    out = io.BytesIO()
    crop.resize((width, height), Image.BILINEAR).save(out, "JPEG", quality=88)
    return out.getvalue()
