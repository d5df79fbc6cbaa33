"""Rendering synthetic street scenes with PIL: textured backgrounds, clutter, people.

A person's identity lives in a `Look` (clothing colours and patterns, hat,
bag, body proportions) fixed per identity; each appearance varies it by scale,
mirroring, stride and lighting, and may be partly hidden by what stands in
front. Backgrounds are vectorised numpy noise plus buildings and road marks,
so a detector has texture and person-like clutter (poles, mannequins) to reject.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from psearch.synth.layout import Figure, Prop, Scene

RGB = tuple[int, int, int]
PATTERNS = ("solid", "hstripes", "vsplit", "checks", "logo")
LOWER_KINDS = ("trousers", "trousers", "shorts", "skirt")
BAGS = ("none", "none", "backpack", "shoulder", "hand")


@dataclass(frozen=True)
class Look:
    skin: RGB
    hair: RGB
    upper: RGB
    upper2: RGB
    lower: RGB
    shoes: RGB
    accessory: RGB
    pattern: str
    long_sleeves: bool
    lower_kind: str
    hat: bool
    bag: str
    head: float  # head height as a fraction of the figure
    legs: float  # leg length as a fraction of the figure
    shoulders: float  # torso width as a fraction of the box width


def _colour(rng, sat=(0.25, 1.0), val=(0.15, 0.95)) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return (int(r * 255), int(g * 255), int(b * 255))


def make_look(rng: np.random.Generator) -> Look:
    skin_v = rng.uniform(0.35, 0.95)
    skin = tuple(
        int(c * 255)
        for c in colorsys.hsv_to_rgb(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6), skin_v)
    )
    return Look(
        skin=skin,
        hair=_colour(rng, sat=(0.1, 0.7), val=(0.05, 0.6)),
        upper=_colour(rng),
        upper2=_colour(rng),
        lower=_colour(rng, val=(0.1, 0.85)),
        shoes=_colour(rng, sat=(0.0, 0.5), val=(0.05, 0.7)),
        accessory=_colour(rng),
        pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
        long_sleeves=bool(rng.random() < 0.6),
        lower_kind=LOWER_KINDS[int(rng.integers(len(LOWER_KINDS)))],
        hat=bool(rng.random() < 0.25),
        bag=BAGS[int(rng.integers(len(BAGS)))],
        head=float(rng.uniform(0.12, 0.16)),
        legs=float(rng.uniform(0.42, 0.5)),
        shoulders=float(rng.uniform(0.42, 0.58)),
    )


def identity_look(seed: int, identity: int) -> Look:
    return make_look(np.random.default_rng([seed, 2, identity]))


def _lit(c: RGB, light) -> RGB:
    return tuple(int(min(255, max(0, v * g))) for v, g in zip(c, light, strict=True))


def draw_person(draw: ImageDraw.ImageDraw, fig: Figure, look: Look) -> None:
    x, y, w, h = fig.box

    def px(u: float) -> float:  # box-relative horizontal position, mirrored for half the views
        return x + (1.0 - u if fig.mirror else u) * w

    def rect(u1, v1, u2, v2, colour):
        a, b = sorted((px(u1), px(u2)))
        draw.rectangle([a, y + v1 * h, max(a, b - 1), max(y + v1 * h, y + v2 * h - 1)], fill=colour)

    def ellipse(u1, v1, u2, v2, colour):
        a, b = sorted((px(u1), px(u2)))
        draw.ellipse([a, y + v1 * h, max(a, b - 1), max(y + v1 * h, y + v2 * h - 1)], fill=colour)

    def limb(u1, v1, u2, v2, width, colour):
        draw.line(
            [(px(u1), y + v1 * h), (px(u2), y + v2 * h)],
            fill=colour,
            width=max(1, round(width * w)),
        )

    light = fig.light
    skin, upper, lower = _lit(look.skin, light), _lit(look.upper, light), _lit(look.lower, light)
    half = look.shoulders / 2
    neck = look.head + 0.02
    hip = 1.0 - look.legs
    swing = 0.05 + 0.12 * fig.pose
    # Bag behind the body first, so the torso covers its inner part.
    if look.bag == "backpack":
        rect(
            0.5 + half - 0.08,
            neck + 0.03,
            0.5 + half + 0.1,
            hip - 0.05,
            _lit(look.accessory, light),
        )
    # Legs, then shoes.
    leg_w = 0.16
    for side in (-1, 1):
        foot_u = 0.5 + side * (0.08 + swing * 0.8)
        limb(
            0.5 + side * 0.09,
            hip,
            foot_u,
            0.97,
            leg_w,
            lower if look.lower_kind == "trousers" else skin,
        )
        if look.lower_kind == "shorts":
            limb(
                0.5 + side * 0.09,
                hip,
                0.5 + side * (0.085 + swing * 0.35),
                hip + 0.45 * look.legs,
                leg_w,
                lower,
            )
        rect(foot_u - 0.09, 0.95, foot_u + 0.09, 1.0, _lit(look.shoes, light))
    if look.lower_kind == "skirt":
        draw.polygon(
            [
                (px(0.5 - half * 0.8), y + hip * h),
                (px(0.5 + half * 0.8), y + hip * h),
                (px(0.5 + half * 1.05), y + (hip + 0.55 * look.legs) * h),
                (px(0.5 - half * 1.05), y + (hip + 0.55 * look.legs) * h),
            ],
            fill=lower,
        )
    # Torso with the identity's pattern.
    rect(0.5 - half, neck, 0.5 + half, hip + 0.02, upper)
    second = _lit(look.upper2, light)
    if look.pattern == "hstripes":
        step = (hip - neck) / 6
        for k in range(1, 6, 2):
            rect(0.5 - half, neck + k * step, 0.5 + half, neck + (k + 1) * step, second)
    elif look.pattern == "vsplit":
        rect(0.5, neck, 0.5 + half, hip + 0.02, second)
    elif look.pattern == "checks":
        step_v, step_u = (hip - neck) / 4, half / 2
        for i in range(4):
            for j in range(4):
                if (i + j) % 2:
                    rect(
                        0.5 - half + j * step_u,
                        neck + i * step_v,
                        0.5 - half + (j + 1) * step_u,
                        neck + (i + 1) * step_v,
                        second,
                    )
    elif look.pattern == "logo":
        rect(
            0.5 - half * 0.45,
            neck + 0.05,
            0.5 + half * 0.45,
            neck + 0.05 + (hip - neck) * 0.35,
            second,
        )
    # Arms swing with the stride; short sleeves show skin below the elbow.
    for side in (-1, 1):
        sx, ex = 0.5 + side * (half + 0.05), 0.5 + side * (half + 0.05 + swing * 0.35)
        ey = hip + 0.04
        limb(sx, neck + 0.03, ex, ey, 0.1, upper if look.long_sleeves else skin)
        if not look.long_sleeves:
            limb(sx, neck + 0.03, (sx + ex) / 2, (neck + ey) / 2, 0.11, upper)
    if look.bag == "shoulder":
        limb(0.5 - half, neck + 0.02, 0.5 + half, hip - 0.04, 0.04, _lit(look.accessory, light))
        rect(
            0.5 + half - 0.05, hip - 0.1, 0.5 + half + 0.15, hip + 0.06, _lit(look.accessory, light)
        )
    elif look.bag == "hand":
        ex = 0.5 + half + 0.05 + swing * 0.35
        rect(ex - 0.06, hip + 0.02, ex + 0.12, hip + 0.13, _lit(look.accessory, light))
    # Head: face, hair on top, optional hat.
    hw = look.head * h * 0.72 / w
    ellipse(0.5 - hw / 2, 0.0, 0.5 + hw / 2, look.head, skin)
    rect(0.5 - hw / 2, 0.0, 0.5 + hw / 2, look.head * 0.35, _lit(look.hair, light))
    if look.hat:
        rect(
            0.5 - hw / 2 - 0.03,
            0.0,
            0.5 + hw / 2 + 0.03,
            look.head * 0.3,
            _lit(look.accessory, light),
        )
        rect(0.5 - hw / 2, 0.0, 0.5 + hw / 2 + 0.12, look.head * 0.12, _lit(look.accessory, light))


def draw_prop(draw: ImageDraw.ImageDraw, prop: Prop) -> None:
    rng = np.random.default_rng(prop.colour_seed)
    x, y, w, h = prop.box
    x2, y2 = x + w - 1, y + h - 1
    main = _colour(rng, sat=(0.0, 0.8), val=(0.2, 0.9))
    dark = tuple(int(c * 0.5) for c in main)
    kind = prop.kind
    if kind == "pole":
        draw.rectangle([x, y + h * 0.08, x2, y2], fill=dark)
        draw.ellipse([x - w, y, x2 + w, y + h * 0.1], fill=main)
    elif kind == "sign":
        cx = x + w / 2
        draw.rectangle([cx - max(1, w * 0.06), y, cx + max(1, w * 0.06), y2], fill=(90, 90, 90))
        draw.rectangle([x, y, x2, y + h * 0.35], fill=main)
    elif kind == "tree":
        draw.rectangle([x + w * 0.42, y + h * 0.45, x + w * 0.58, y2], fill=(90, 60, 30))
        draw.ellipse([x, y, x2, y + h * 0.6], fill=_colour(rng, sat=(0.4, 0.9), val=(0.25, 0.6)))
    elif kind == "car":
        draw.rectangle([x, y + h * 0.35, x2, y + h * 0.85], fill=main)
        draw.rectangle([x + w * 0.2, y, x + w * 0.75, y + h * 0.4], fill=main)
        draw.rectangle(
            [x + w * 0.25, y + h * 0.07, x + w * 0.7, y + h * 0.35], fill=(150, 180, 200)
        )
        for cx in (x + w * 0.22, x + w * 0.78):
            draw.ellipse([cx - h * 0.17, y + h * 0.66, cx + h * 0.17, y2], fill=(20, 20, 20))
    elif kind == "crate":
        draw.rectangle([x, y, x2, y2], fill=main, outline=dark, width=max(1, w // 12))
        draw.line([(x, y), (x2, y2)], fill=dark, width=max(1, w // 14))
    elif kind == "bin":
        draw.rectangle([x + w * 0.1, y + h * 0.12, x2 - w * 0.1, y2], fill=main)
        draw.rectangle([x, y, x2, y + h * 0.14], fill=dark)
    elif kind == "hedge":
        draw.rectangle([x, y + h * 0.15, x2, y2], fill=_colour(rng, sat=(0.5, 0.9), val=(0.2, 0.5)))
        for _ in range(6):
            cx, cy = rng.uniform(x, x2), rng.uniform(y, y + h * 0.5)
            draw.ellipse(
                [cx - w * 0.12, cy - h * 0.15, cx + w * 0.12, cy + h * 0.15],
                fill=_colour(rng, sat=(0.5, 0.9), val=(0.2, 0.55)),
            )
    elif kind == "mannequin":  # head-and-body silhouette on a stand: person-like, not a person
        draw.ellipse([x + w * 0.3, y, x + w * 0.7, y + h * 0.18], fill=main)
        draw.rectangle([x + w * 0.1, y + h * 0.2, x2 - w * 0.1, y + h * 0.7], fill=_colour(rng))
        draw.rectangle([x + w * 0.45, y + h * 0.7, x + w * 0.55, y2], fill=dark)
    else:  # pillar
        draw.rectangle([x, y, x2, y2], fill=main)
        for k in range(1, 4):
            gx = x + k * w / 4
            draw.line([(gx, y), (gx, y2)], fill=dark, width=1)


def background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Sky or wall over ground, low-frequency colour noise and grain, buildings and road marks."""
    horizon = int(rng.uniform(0.3, 0.55) * height)
    top = np.array(_colour(rng, sat=(0.0, 0.5)), dtype=np.float32)
    ground = np.array(_colour(rng, sat=(0.0, 0.4), val=(0.2, 0.7)), dtype=np.float32)
    rows = np.arange(height, dtype=np.float32)[:, None]
    base = np.where(rows < horizon, top, ground) * (0.85 + 0.3 * rows / height)  # (H, 3)
    # Low-frequency texture: mostly brightness, a little colour (stone, foliage, shadows).
    grid = (height // 12 + 2, width // 12 + 2)
    coarse = rng.normal(0, 1, (*grid, 1)) * 30 + rng.normal(0, 1, (*grid, 3)) * 10
    small = Image.fromarray((coarse + 128).clip(0, 255).astype(np.uint8))
    pixels = np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.float32)
    pixels += base[:, None, :] - 128
    pixels += rng.integers(-10, 11, (height, width, 1), dtype=np.int8)  # sensor grain
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):  # buildings standing on the horizon, with windows
        bw, bh = int(rng.uniform(0.1, 0.35) * width), int(rng.uniform(0.15, 0.45) * height)
        bx = int(rng.integers(-bw // 2, width))
        colour = _colour(rng, sat=(0.0, 0.4), val=(0.3, 0.8))
        draw.rectangle([bx, horizon - bh, bx + bw, horizon], fill=colour)
        window = tuple(int(c * 0.55) for c in colour)
        step = max(4, bw // 5)
        for wx in range(bx + step // 3, bx + bw - step // 2, step):
            for wy in range(horizon - bh + step // 3, horizon - step // 2, step):
                draw.rectangle([wx, wy, wx + step // 2, wy + step // 2], fill=window)
    for _ in range(int(rng.integers(0, 3))):  # road markings converging to the horizon
        x0 = rng.uniform(0, width)
        draw.line(
            [(x0, height), (width / 2 + (x0 - width / 2) * 0.2, horizon)],
            fill=(220, 220, 210),
            width=max(1, width // 120),
        )
    return img


def render(scene: Scene, seed: int) -> Image.Image:
    img = background(np.random.default_rng([scene.background_seed]), scene.width, scene.height)
    draw = ImageDraw.Draw(img)
    for item in scene.items:
        if isinstance(item, Figure):
            look = (
                identity_look(seed, item.identity)
                if item.identity >= 0
                else make_look(np.random.default_rng(item.look_seed))
            )
            draw_person(draw, item, look)
        else:
            draw_prop(draw, item)
    return img
