"""`synthesize`: a synthetic person-search benchmark written in the exact CUHK-SYSU layout.

The plan (who stands where, the protocols) comes from `plan`, the
pixels from `drawing`, the annotation files from `sysu_writer`. Everything is
derived from the seed, so the same preset and seed give identical bytes. The
ground truth is also written as `synthetic_truth.json` beside the layout (no
reader uses it; it lets users and tests check an ingest against intent).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from psearch.atomic import atomic_dir, check_writable
from psearch.diskspace import SMALL, check_free_space
from psearch.errors import PsearchError
from psearch.synth.drawing import render
from psearch.synth.layout import Preset
from psearch.synth.plan import PRESETS, DatasetPlan, Scene, plan_dataset
from psearch.synth.sysu_writer import write_annotations

IMAGE_DIR = Path("Image") / "SSM"
TRUTH_FILE = "synthetic_truth.json"
JPEG_QUALITY = 90
PARALLEL_FROM = 2000  # images; below this a worker pool costs more than it saves


def synthesize(out: Path, preset: str, seed: int) -> dict[str, Any]:
    """Write the `preset` dataset for `seed` to `out` (atomically); return summary counts."""
    if preset not in PRESETS:
        raise PsearchError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    if seed < 0:
        raise PsearchError(f"seed {seed} must be >= 0")
    out = Path(out)
    check_writable(out)
    check_free_space({out: estimated_bytes(PRESETS[preset])})
    plan = plan_dataset(preset, seed)
    with atomic_dir(out) as tmp:
        image_dir = tmp / IMAGE_DIR
        image_dir.mkdir(parents=True)
        _render_all(plan, image_dir, progress=preset != "tiny")
        write_annotations(plan, tmp)
        (tmp / TRUTH_FILE).write_text(json.dumps(truth(plan)))
    return summary(plan)


def estimated_bytes(preset: Preset) -> int:
    """What a preset writes, on the high side: a byte a pixel for every image at its largest
    size (the JPEGs measure 0.4-0.7 bytes a pixel: the demo preset's 480 images are 23 MB)."""
    sizes = [size for size, _ in preset.image_sizes] or [(preset.width, preset.height)]
    pixels = max(width * height for width, height in sizes)
    return (preset.train_images + preset.test_images) * pixels + SMALL


def _render_one(args: tuple[Scene, int, str]) -> None:
    scene, seed, directory = args
    render(scene, seed).save(os.path.join(directory, scene.name), quality=JPEG_QUALITY)


def _render_all(plan: DatasetPlan, image_dir: Path, progress: bool) -> None:
    jobs = [(scene, plan.seed, str(image_dir)) for scene in plan.scenes]
    bar = tqdm(total=len(jobs), desc="synth images", unit="img", disable=not progress, leave=False)
    workers = min(os.cpu_count() or 1, 8)
    if len(jobs) >= PARALLEL_FROM and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_render_one, jobs, chunksize=64):
                bar.update()
    else:
        for job in jobs:
            _render_one(job)
            bar.update()
    bar.close()


def summary(plan: DatasetPlan) -> dict[str, Any]:
    boxes = sum(len(s.box_order) for s in plan.scenes)
    zero = sum(len(s.zero_size) for s in plan.scenes)
    labelled = sum(len(v) for v in plan.appearances.values())
    return {
        "preset": plan.preset,
        "seed": plan.seed,
        "images": len(plan.scenes),
        "train_images": sum(s.split == "train" for s in plan.scenes),
        "test_images": sum(s.split == "test" for s in plan.scenes),
        "train_identities": len(plan.train_ids),
        "test_identities": len(plan.test_ids),
        "boxes": boxes,
        "labelled_boxes": labelled,
        "zero_size_boxes": zero,
        "queries": len(plan.queries),
        "gallery_sizes": sorted(plan.galleries),
        "occluded_queries": sum(q.occluded for q in plan.queries),
        "low_resolution_queries": len(plan.low_resolution),
    }


def truth(plan: DatasetPlan) -> dict[str, Any]:
    """What the generator intended, in dataset terms (names and [x y w h] boxes)."""
    images = []
    for scene in plan.scenes:
        boxes = [
            {
                "box": list(b),
                "person": plan.identity_names[f.identity] if f and f.identity >= 0 else None,
            }
            for b, f in scene.annotated_boxes()
        ]
        images.append(
            {
                "name": scene.name,
                "split": scene.split,
                "width": scene.width,
                "height": scene.height,
                "boxes": boxes,
            }
        )
    low_res = set(plan.low_resolution)
    queries = [
        {
            "person": plan.identity_names[q.identity],
            "image": plan.scenes[q.image].name,
            "box": list(q.box),
            "occluded": q.occluded,
            "low_resolution": k in low_res,
        }
        for k, q in enumerate(plan.queries)
    ]
    return {
        "summary": summary(plan),
        "train_persons": [plan.identity_names[p] for p in plan.train_ids],
        "test_persons": [plan.identity_names[p] for p in plan.test_ids],
        "images": images,
        "queries": queries,
    }
