"""Laying out one synthetic scene: where each person, occluder and piece of clutter stands.

Labelled people are placed apart from each other; background people and
clutter take the least obtrusive of a few candidate spots, so that heavy
occlusion of a labelled person is the deliberate exception (an occluder put
in front of it) rather than an accident. Drawing order is depth order: items
whose feet are higher up in the image are farther away and drawn first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

BACKGROUND_PER_IMAGE = 4.2  # CUHK-SYSU: ~99,800 boxes over 18,184 images, ~23,400 labelled


@dataclass(frozen=True)
class Preset:
    train_images: int
    test_images: int
    train_ids: int
    test_ids: int
    width: int
    height: int
    gallery_sizes: tuple[int, ...]
    extra_named: int  # Person.mat names more people than the split uses, as the release does
    # Realistic-resolution presets only (both empty = every image width x height, people sized
    # as a fraction of it): ((width, height), weight) per image size, drawn per scene, and
    # person heights in pixels as (labelled median, background median, log sigma, low, high).
    image_sizes: tuple[tuple[tuple[int, int], float], ...] = ()
    person_heights: tuple[float, float, float, float, float] | None = None


PRESETS: dict[str, Preset] = {
    "tiny": Preset(40, 120, 15, 24, 200, 150, (50, 100), 4),
    "demo": Preset(320, 160, 160, 80, 400, 300, (50, 100), 20),
    "full": Preset(11206, 6978, 5532, 2900, 160, 120, (50, 100, 500, 1000, 2000, 4000), 3502),
    # `psearch paper`'s data: the demo's training split size, people and resolution, and a test
    # split large enough for galleries 50 to 500 (the paper's Fig. 7(b) needs a curve; the
    # demo's 160 test images stop at 100). Its own draw: not the demo's images.
    "paper-demo": Preset(320, 520, 160, 260, 400, 300, (50, 100, 200, 500), 20),
    # The paper's Fig. 6 at many identities (RSS against the plain softmax as C grows):
    # 3,000 training identities on small images, so a short CPU run sees them.
    "many-ids": Preset(4000, 120, 3000, 40, 160, 120, (50, 100), 20),
    # CUHK-SYSU's resolution: street snaps (800 x 600 either way up) and movie frames (16:9, 4:3).
    # Person heights follow a log-normal truncated to the release's annotated range [50, 500] px:
    # the release's height histograms (the paper's Fig. 2) are unimodal and right-skewed, most
    # people 80-250 px tall with a thin tail to ~500, and queries larger than background people.
    # Medians 160 / 110 px with sigma 0.5 put ~75 % of labelled people in 80-250 px and ~2 % over
    # 400 px. A 500-image gallery needs over 500 test images (each query's gallery is that many
    # other test images), hence the test split larger than the training one.
    "paper-scale": Preset(
        300,
        520,
        150,
        250,
        800,
        600,
        (50, 100, 500),
        20,
        image_sizes=(
            ((800, 600), 0.35),
            ((600, 800), 0.2),
            ((1024, 576), 0.15),
            ((1280, 720), 0.15),
            ((960, 720), 0.15),
        ),
        person_heights=(160.0, 110.0, 0.5, 50.0, 500.0),
    ),
}


@dataclass
class Figure:
    """One drawn person: box (x, y, w, h) in pixels; identity -1 = unlabelled background."""

    box: tuple[int, int, int, int]
    identity: int
    look_seed: int  # background people get a one-off look drawn from this seed
    mirror: bool
    pose: float  # stride / arm swing in [0, 1]
    light: tuple[float, float, float]  # per-channel lighting gain
    hard: bool = False
    occlusion: float = 0.0  # labelled people: fraction of the box covered by things in front


@dataclass
class Prop:
    """A non-person object: clutter, or an occluder placed in front of a person."""

    kind: str
    box: tuple[int, int, int, int]
    colour_seed: int


@dataclass
class Scene:
    name: str
    split: str
    width: int
    height: int
    items: list[Figure | Prop]  # in drawing order: far (higher up) first
    box_order: list[int | None]  # Images.mat order: index into figures(), None = zero-size box
    zero_size: list[tuple[int, int, int, int]]
    background_seed: int

    def figures(self) -> list[Figure]:
        return [it for it in self.items if isinstance(it, Figure)]

    def annotated_boxes(self) -> list[tuple[tuple[int, int, int, int], Figure | None]]:
        """(box, figure or None for a zero-size box) in Images.mat order."""
        figs = self.figures()
        zeros = iter(self.zero_size)
        return [
            (figs[i].box, figs[i]) if i is not None else (next(zeros), None) for i in self.box_order
        ]


def _person_size(rng, cfg: Preset, labelled: bool) -> tuple[int, int]:
    """(w, h): labelled people are larger on average; about one in eight is small."""
    if cfg.person_heights is not None:
        return _person_size_px(rng, cfg, labelled)
    if labelled:
        frac = (
            rng.uniform(0.16, 0.28)
            if rng.random() < 0.12
            else np.exp(rng.uniform(np.log(0.3), np.log(0.85)))
        )
    else:
        frac = np.exp(rng.uniform(np.log(0.14), np.log(0.55)))
    h = max(16, round(frac * cfg.height))
    w = max(6, round(h * rng.uniform(0.34, 0.46)))
    return w, h


def _person_size_px(rng, cfg: Preset, labelled: bool) -> tuple[int, int]:
    """(w, h) with h from the preset's truncated log-normal (redrawn until inside the range)."""
    labelled_median, background_median, sigma, low, high = cfg.person_heights
    mu = np.log(labelled_median if labelled else background_median)
    high = min(high, cfg.height)  # a person never taller than the image
    while True:
        h = round(float(np.exp(rng.normal(mu, sigma))))
        if low <= h <= high:
            break
    w = max(6, round(h * rng.uniform(0.34, 0.46)))
    return w, h


def _scene_canvas(rng, cfg: Preset) -> Preset:
    """The preset with this scene's image size (drawn only when the preset lists several)."""
    if not cfg.image_sizes:
        return cfg
    sizes = [size for size, _ in cfg.image_sizes]
    weights = np.array([weight for _, weight in cfg.image_sizes])
    width, height = sizes[int(rng.choice(len(sizes), p=weights / weights.sum()))]
    return dataclasses.replace(cfg, width=width, height=height)


def _place(
    rng, cfg: Preset, w: int, h: int, avoid: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int]:
    """Feet in the lower part of the image; few tries to keep labelled people apart."""
    best = None
    for _ in range(8):
        x = int(rng.integers(0, cfg.width - w + 1))
        bottom = int(rng.integers(max(h, int(0.5 * cfg.height)), cfg.height + 1))
        cand = (x, bottom - h, w, h)
        overlap = max((_iou(cand, b) for b in avoid), default=0.0)
        if best is None or overlap < best[0]:
            best = (overlap, cand)
        if overlap < 0.2:
            break
    return best[1]


def _iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _figure(rng, box, identity: int) -> Figure:
    light = tuple(float(g) for g in rng.uniform(0.75, 1.2) * rng.uniform(0.92, 1.08, size=3))
    return Figure(
        box,
        identity,
        int(rng.integers(2**31)),
        bool(rng.random() < 0.5),
        float(rng.random()),
        light,
    )


def _occluder(rng, cfg: Preset, box) -> Prop:
    """An object in front of `box` covering 45-70 % of it, from below or from one side."""
    x, y, w, h = box
    frac = rng.uniform(0.45, 0.7)
    if rng.random() < 0.65:
        cover_h = int(np.ceil(frac * h))
        extra = int(rng.integers(0, max(1, w // 2)))
        ox = max(0, x - extra)
        ow = min(cfg.width, x + w + int(rng.integers(0, max(1, w // 2)))) - ox
        kind = str(rng.choice(["car", "crate", "hedge"]))
        return Prop(
            kind,
            (ox, y + h - cover_h, ow, cover_h + int(rng.integers(0, 4))),
            int(rng.integers(2**31)),
        )
    cover_w = int(np.ceil(frac * w))
    ox = x if rng.random() < 0.5 else x + w - cover_w
    top = max(0, y - int(rng.integers(0, max(1, h // 3))))
    return Prop("pillar", (ox, top, cover_w, y + h - top + 2), int(rng.integers(2**31)))


CLUTTER_KINDS = ("pole", "tree", "car", "crate", "sign", "bin", "mannequin", "hedge")


def _clutter_shape(rng, cfg: Preset) -> tuple[str, int, int]:
    kind = str(rng.choice(CLUTTER_KINDS))
    H, W = cfg.height, cfg.width
    if kind in ("pole", "sign"):
        h = int(rng.uniform(0.3, 0.9) * H)
        w = (
            max(3, int(h * rng.uniform(0.04, 0.1)))
            if kind == "pole"
            else max(6, int(h * rng.uniform(0.2, 0.35)))
        )
    elif kind == "tree":
        h = int(rng.uniform(0.35, 0.9) * H)
        w = int(h * rng.uniform(0.35, 0.6))
    elif kind == "mannequin":  # person-shaped proportions, not a person: a hard negative
        h = int(rng.uniform(0.2, 0.6) * H)
        w = int(h * rng.uniform(0.3, 0.45))
    elif kind == "car":
        w = int(rng.uniform(0.2, 0.45) * W)
        h = int(w * rng.uniform(0.35, 0.5))
    else:
        h = int(rng.uniform(0.08, 0.3) * H)
        w = int(h * rng.uniform(0.6, 1.8))
    return kind, max(4, min(w, W)), max(4, min(h, H))


def _clutter_at(rng, cfg: Preset, kind: str, w: int, h: int) -> Prop:
    x = int(rng.integers(0, cfg.width - w + 1))
    bottom = int(rng.integers(max(h, int(0.45 * cfg.height)), cfg.height + 1))
    return Prop(kind, (x, bottom - h, w, h), int(rng.integers(2**31)))


def _occluding_rect(item: Figure | Prop) -> tuple[float, float, float, float]:
    """The part of an item's box that hides what is behind it (a figure fills its middle 60 %)."""
    x, y, w, h = item.box
    if isinstance(item, Figure):
        return (x + 0.2 * w, y, x + 0.8 * w, y + h)
    return (x, y, x + w, y + h)


def _cover(rect, box) -> float:
    """Fraction of `box` (x, y, w, h) inside `rect` (x1, y1, x2, y2)."""
    x, y, w, h = box
    ix = min(rect[2], x + w) - max(rect[0], x)
    iy = min(rect[3], y + h) - max(rect[1], y)
    return ix * iy / (w * h) if ix > 0 and iy > 0 else 0.0


def _unobtrusive(
    rng, make, labelled: list[tuple[float, tuple[int, int, int, int]]], depth_offset: float
):
    """Background people and clutter: of a few candidate placements, the one hiding least of any
    labelled person standing behind it, so that heavy occlusion stays the deliberate exception."""
    best = None
    for _ in range(6):
        item = make()
        key = item.box[1] + item.box[3] + depth_offset
        rect = _occluding_rect(item)
        worst = max((_cover(rect, box) for k, box in labelled if k < key), default=0.0)
        if best is None or worst < best[0]:
            best = (worst, key, item)
        if worst < 0.1:
            break
    return best[1], best[2]


def layout_scene(rng, cfg: Preset, name: str, split: str, people, with_zero: bool) -> Scene:
    cfg = _scene_canvas(rng, cfg)
    placed: list[tuple[float, Figure | Prop]] = []  # (depth key, item); larger key = nearer
    labelled: list[tuple[float, tuple[int, int, int, int]]] = []
    for pid, _is_query, occlude in people:
        w, h = _person_size(rng, cfg, labelled=True)
        box = _place(rng, cfg, w, h, [b for _, b in labelled])
        labelled.append((box[1] + box[3], box))
        placed.append((box[1] + box[3], _figure(rng, box, pid)))
        if occlude:
            placed.append((box[1] + box[3] + 0.5, _occluder(rng, cfg, box)))

    def background_person(w: int, h: int) -> Figure:
        fig = _figure(rng, _place(rng, cfg, w, h, []), -1)
        fig.hard = h < 0.18 * cfg.height
        return fig

    # Sizes and kinds are drawn once; only the position is retried.
    for _ in range(int(np.clip(rng.poisson(BACKGROUND_PER_IMAGE), 1, 9))):
        w, h = _person_size(rng, cfg, labelled=False)
        placed.append(_unobtrusive(rng, lambda w=w, h=h: background_person(w, h), labelled, -0.25))
    for _ in range(int(rng.integers(2, 7))):
        kind, w, h = _clutter_shape(rng, cfg)
        placed.append(
            _unobtrusive(
                rng, lambda k=kind, w=w, h=h: _clutter_at(rng, cfg, k, w, h), labelled, -0.75
            )
        )
    placed.sort(key=lambda kv: kv[0])
    items = [item for _, item in placed]
    _measure_occlusion(items)
    n_figures = sum(isinstance(it, Figure) for it in items)
    zero = []
    if with_zero:  # the release has a few boxes with w or h <= 0; readers must drop them
        x, y = int(rng.integers(0, cfg.width)), int(rng.integers(0, cfg.height))
        zero = (
            [(x, y, 0, int(rng.integers(1, 40)))]
            if rng.random() < 0.5
            else [(x, y, int(rng.integers(1, 30)), 0)]
        )
    order: list[int | None] = [int(i) for i in rng.permutation(n_figures)]
    for _ in zero:
        order.insert(int(rng.integers(0, len(order) + 1)), None)
    return Scene(name, split, cfg.width, cfg.height, items, order, zero, int(rng.integers(2**31)))


def _measure_occlusion(items: list[Figure | Prop]) -> None:
    """For each labelled person: the fraction of the box covered by things drawn after it."""
    rects = [_occluding_rect(it) for it in items]
    for k, it in enumerate(items):
        if not isinstance(it, Figure) or it.identity < 0:
            continue
        x, y, w, h = it.box
        covered = np.zeros((h, w), dtype=bool)
        for x1, y1, x2, y2 in rects[k + 1 :]:
            a, b = max(0, min(w, math.floor(x1 - x))), max(0, min(w, math.ceil(x2 - x)))
            c, d = max(0, min(h, math.floor(y1 - y))), max(0, min(h, math.ceil(y2 - y)))
            covered[c:d, a:b] = True
        it.occlusion = float(covered.mean())
