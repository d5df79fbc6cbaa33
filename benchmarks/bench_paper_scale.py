"""The recipes at their real resolution: training and extraction speed and peak memory.

For each recipe in configs/ (paper-vgg16-rss, oim-resnet50) on the paper-scale synthetic
preset (800x600 and larger scenes, persons 50-500 px): build the joint net with the recipe's
settings (random weights: same compute as ImageNet's, no download), run a few training
iterations through the training engine's own step (SGD, autocast, the four losses) and time
them after one warm-up, then detect + extract features on a few gallery images.

Needs only torch, torchvision, numpy, pyarrow, pillow and pyyaml (no MLflow, no network):
    PYTHONPATH=src python benchmarks/bench_paper_scale.py --device cuda [--amp bf16|fp32]
    PYTHONPATH=src python benchmarks/bench_paper_scale.py            # CPU smoke: 2 iterations
Targets on one H200 (issue #13): VGG16 joint training >= 12 images/s in bf16, extraction
>= 60 images/s at 600/1000, peak memory at batch 2 <= 12 GB; ResNet-50/OIM within 2x.
Each recipe runs in its own process, so peak memory belongs to one network.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from bench_extract import run_in_child  # each recipe in its own process: its own peak memory

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("paper-vgg16-rss", "oim-resnet50")
TARGETS = {"train_images_per_s": 12.0, "extract_images_per_s": 60.0, "peak_gib": 12.0}


def prepare_data(root: Path) -> Path:
    """The paper-scale synthetic set, ingested; returns the manifests directory."""
    from psearch.data.ingest import ingest
    from psearch.synth import synthesize

    manifests = root / "manifests"
    if not (manifests / "images.parquet").exists():
        synthesize(root / "raw", preset="paper-scale", seed=0)
        ingest(root / "raw", manifests, fmt="cuhk-sysu")
    return manifests


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(recipe: str, manifests: str, device: str, amp: str, iters: int, images: int) -> dict:
    """Train `iters` timed iterations (after one warm-up) and extract `images` gallery images."""
    import dataclasses

    import torch

    from psearch.config import load_params, to_dict
    from psearch.data.loaders import (
        SceneDataset,
        TestImageDataset,
        list_collate,
        num_train_identities,
    )
    from psearch.data.manifest import read_manifests
    from psearch.models.joint import build_joint_net
    from psearch.train.engine import Engine, _autocast
    from psearch.train.joint import forward_scenes

    params = load_params(REPO / "configs" / f"{recipe}.yaml")
    model_cfg = dataclasses.replace(params.model, backbone_weights=None)  # no download
    cfg = dataclasses.replace(
        params.train, device=device, amp="off" if amp == "fp32" else amp, num_workers=0
    )
    tables = read_manifests(Path(manifests))
    classes = num_train_identities(tables)
    torch.manual_seed(0)
    net = build_joint_net(classes, loss=to_dict(cfg.loss), **to_dict(model_cfg))
    scenes = SceneDataset(tables, classes, "train", hflip=cfg.hflip, seed=0)
    engine = Engine(net, scenes, forward_scenes, cfg, None, "bench", list_collate, progress=False)
    dev = engine.device
    batches = [
        list_collate([scenes[(0, i * cfg.batch_size + j)] for j in range(cfg.batch_size)])
        for i in range(iters + 1)
    ]
    engine.model.train()
    engine._train_step(batches[0])  # warm-up: cuDNN autotuning, allocator growth
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for batch in batches[1:]:
        engine._train_step(batch)
    _sync(dev)
    train_seconds = time.perf_counter() - started
    peak_train = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None

    gallery = TestImageDataset(tables, "test")
    frames = [gallery[i][1] for i in range(min(images + 1, len(gallery)))]
    net = engine.model.eval()
    use_amp = params.extract.amp and amp != "fp32"
    batch = params.extract.batch_size
    with torch.no_grad(), _autocast(dev, amp if use_amp else "off"):
        net([f.to(dev) for f in frames[:1]])  # warm-up
        _sync(dev)
        started = time.perf_counter()
        for i in range(1, len(frames), batch):
            net([f.to(dev) for f in frames[i : i + batch]])
        _sync(dev)
    extract_seconds = time.perf_counter() - started
    out = {
        "recipe": recipe,
        "device": dev.type,
        "amp": amp if dev.type == "cuda" else "fp32 (CPU)",
        "backbone": model_cfg.backbone,
        "input": f"{model_cfg.min_size}/{model_cfg.max_size}",
        "batch": cfg.batch_size,
        "iters": iters,
        "s_per_iter": train_seconds / iters,
        "train_images_per_s": iters * cfg.batch_size / train_seconds,
        "extract_images": len(frames) - 1,
        "extract_images_per_s": (len(frames) - 1) / extract_seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        out["peak_train_gib"] = peak_train / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (cpu 2, cuda 20)")
    parser.add_argument("--images", type=int, default=None, help="gallery images (cpu 4, cuda 64)")
    parser.add_argument("--data", type=Path, default=None, help="reuse this synthetic data dir")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.iters = args.iters or (20 if cuda else 2)
    args.images = args.images or (64 if cuda else 4)
    root = args.data or Path(tempfile.mkdtemp(prefix="bench-paper-scale-"))
    started = time.perf_counter()
    manifests = prepare_data(root)
    print(f"paper-scale data: {root} ({time.perf_counter() - started:.0f} s to write and ingest)")
    header = (
        f"{'recipe':<16} {'dev':<4} {'amp':<10} {'input':<9} {'batch':>5} {'s/iter':>7} "
        f"{'train img/s':>11} {'extract img/s':>13} {'peak GiB':>8}"
    )
    print(header)
    for recipe in args.recipes.split(","):
        r = run_in_child(
            "bench_paper_scale",
            dict(
                recipe=recipe,
                manifests=str(manifests),
                device=args.device,
                amp=args.amp,
                iters=args.iters,
                images=args.images,
            ),
        )
        peak = r.get("peak_train_gib", r["peak_rss_gib"])
        print(
            f"{r['recipe']:<16} {r['device']:<4} {r['amp']:<10} {r['input']:<9} {r['batch']:>5} "
            f"{r['s_per_iter']:>7.2f} {r['train_images_per_s']:>11.2f} "
            f"{r['extract_images_per_s']:>13.2f} {peak:>8.2f}"
            + (f"  {r['gpu']}" if "gpu" in r else f"  (peak RSS, {r['threads']} threads)")
        )
    if cuda:
        print(f"targets (VGG16, H200, bf16): {json.dumps(TARGETS)}; ResNet-50/OIM within 2x")
    else:
        print("CPU smoke only: GPU unmeasured (run with --device cuda on a GPU machine)")


if __name__ == "__main__":
    main()
