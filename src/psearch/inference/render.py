"""The picture of a search: the query crop beside its top-k gallery images, boxes drawn.

A grid of fixed-size tiles (so the picture's size depends only on the number of matches):
the first tile is the query crop, then one tile per match in rank order, each the whole
gallery image scaled to fit, the matched box drawn on it and a caption with its rank,
similarity and detection score above it (and, for a video frame, its time in the video).
Over a video gallery the matches can also be a clip (`render_clip`): the matched frames in
the order they happen, each held for a second, box and time drawn on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from psearch.atomic import atomic_file
from psearch.errors import PsearchError
from psearch.inference.video import CLIP_FORMATS, read_frame, write_clip

TILE_W, TILE_H = 256, 192
CAPTION_H = 22
MARGIN = 8
MAX_COLUMNS = 6
BACKGROUND = (245, 245, 245)
TILE_BACKGROUND = (30, 30, 30)
TOP1_COLOUR = (40, 200, 60)
OTHER_COLOUR = (255, 150, 0)
QUERY_COLOUR = (60, 140, 255)


def canvas_size(tiles: int) -> tuple[int, int]:
    """(width, height) of a picture holding `tiles` tiles (the query plus the matches)."""
    columns = min(MAX_COLUMNS, max(1, tiles))
    rows = -(-max(1, tiles) // MAX_COLUMNS)
    return (
        MARGIN + columns * (TILE_W + MARGIN),
        MARGIN + rows * (CAPTION_H + TILE_H + MARGIN),
    )


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image) -> tuple[Image.Image, float, tuple[int, int]]:
    """The image scaled to fit a tile, its scale, and its offset inside the tile."""
    scale = min(TILE_W / image.width, TILE_H / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    offset = ((TILE_W - size[0]) // 2, (TILE_H - size[1]) // 2)
    return image.resize(size, Image.Resampling.BILINEAR), scale, offset


def _tile_origin(index: int) -> tuple[int, int]:
    row, column = divmod(index, MAX_COLUMNS)
    return MARGIN + column * (TILE_W + MARGIN), MARGIN + row * (CAPTION_H + TILE_H + MARGIN)


def _paste_tile(
    canvas: Image.Image,
    index: int,
    image: Image.Image,
    caption: str,
    colour: tuple[int, int, int],
    box: list[float] | None = None,
) -> None:
    draw = ImageDraw.Draw(canvas)
    left, top = _tile_origin(index)
    font = _font()
    while len(caption) > 4 and draw.textlength(caption, font=font) > TILE_W - 4:
        caption = caption[:-2] + "…"  # keep long file names inside the tile
    draw.text((left + 2, top + 3), caption, fill=(0, 0, 0), font=font)
    top += CAPTION_H
    draw.rectangle([left, top, left + TILE_W - 1, top + TILE_H - 1], fill=TILE_BACKGROUND)
    fitted, scale, (dx, dy) = _fit(image)
    canvas.paste(fitted, (left + dx, top + dy))
    if box is not None:
        x1, y1, x2, y2 = (v * scale for v in box)
        shape = [left + dx + x1, top + dy + y1, left + dx + x2, top + dy + y2]
        draw.rectangle(shape, outline=colour, width=3)
    else:
        draw.rectangle([left, top, left + TILE_W - 1, top + TILE_H - 1], outline=colour, width=3)


def render_search(
    query_image: Path, query_box: list[float], matches: list[dict[str, Any]], out: Path
) -> tuple[int, int]:
    """Draw the query crop and the matches (dicts with image, box x1y1x2y2, similarity,
    score, rank) to the PNG `out`; returns its size."""
    size = canvas_size(1 + len(matches))
    canvas = Image.new("RGB", size, BACKGROUND)
    with Image.open(query_image) as image:
        crop = image.convert("RGB").crop(tuple(round(v) for v in query_box))
    _paste_tile(canvas, 0, crop, "query", QUERY_COLOUR)
    for index, match in enumerate(matches, start=1):
        caption = (
            f"#{match['rank']}  sim {match['similarity']:.3f}  det {match['score']:.2f}  "
            f"{match_name(match)}"
        )
        colour = TOP1_COLOUR if match["rank"] == 1 else OTHER_COLOUR
        _paste_tile(canvas, index, _scene(match), caption, colour, box=match["box"])
    with atomic_file(out) as tmp:
        canvas.save(tmp, format="PNG")
    return size


def match_name(match: dict[str, Any]) -> str:
    """The matched image's file name; for a video frame, the video's and the time."""
    if match.get("video"):
        return f"{Path(match['video']).name} @ {format_time(match['time_s'])}"
    return Path(match["image"]).name


def format_time(seconds: float) -> str:
    """12.5 -> '0:12.50', 3725.25 -> '1:02:05.25'."""
    minutes, secs = divmod(float(seconds), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}" if hours else f"{minutes}:{secs:05.2f}"


def _scene(match: dict[str, Any]) -> Image.Image:
    """The whole gallery image of a match: a file, or a frame decoded from its video."""
    if match.get("video"):
        return Image.fromarray(read_frame(match["video"], match["frame"], match["time_s"]))
    with Image.open(match["image"]) as image:
        return image.convert("RGB")


# Clip: frames per second, and frames each match is shown for.
CLIP_FPS, CLIP_HOLD = 4, 4


def is_clip(out: Path) -> bool:
    return Path(out).suffix.lower() in CLIP_FORMATS


def render_clip(matches: list[dict[str, Any]], out: Path) -> tuple[int, int]:
    """The matched video frames in time order (video, then time), each with its box, rank
    and time drawn, as a clip at `out` (.mp4, .mov, .mkv or .avi); returns its size."""
    if not matches:
        raise PsearchError(f"{out}: no match to show (nothing above the detection threshold)")
    if not all(match.get("video") for match in matches):
        raise PsearchError(f"{out}: a clip needs a video gallery (psearch extract --video)")
    ordered = sorted(matches, key=lambda m: (m["video"], m["time_s"]))
    first = _scene(ordered[0])
    # yuv420p needs even sides; every frame is scaled to the first one's size.
    size = (first.width - first.width % 2, first.height - first.height % 2)
    pictures = []
    for match in ordered:
        scene = _scene(match).convert("RGB")
        scale = (size[0] / scene.width, size[1] / scene.height)
        scene = scene.resize(size, Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(scene)
        x1, y1, x2, y2 = match["box"]
        colour = TOP1_COLOUR if match["rank"] == 1 else OTHER_COLOUR
        shape = [x1 * scale[0], y1 * scale[1], x2 * scale[0], y2 * scale[1]]
        draw.rectangle(shape, outline=colour, width=2)
        caption = f"#{match['rank']} {match_name(match)} sim {match['similarity']:.3f}"
        draw.text((3, 3), caption, fill=(255, 255, 255), font=_font(12))
        pictures.append(np.asarray(scene))
    with atomic_file(out) as tmp:
        write_clip(pictures, tmp, CLIP_FPS, CLIP_HOLD, Path(out).suffix)
    return size
