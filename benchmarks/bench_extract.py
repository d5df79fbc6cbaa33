"""Extraction throughput and memory (psearch extract on random-init models).

CPU: the small backbone at the demo resolution (params defaults: shorter side 288) on 400x300
scenes, with two gallery sizes in separate processes, to show that peak memory does not grow
with the gallery (results are streamed to Parquet). GPU (when CUDA is available): ResNet-50 at
CUHK-SYSU resolution (shorter side 900, longer at most 1500) with bf16 autocast, on 800x600
scenes; the target is >= 60 images/s on one H100.

    .venv/bin/python benchmarks/bench_extract.py [--cpu-images 24 96] [--gpu-images 400]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_gallery(root: Path, count: int, height: int, width: int) -> Path:
    """`count` noisy JPEG scenes as a test split, and their manifests (no boxes, no queries)."""
    import pyarrow as pa
    from PIL import Image

    from psearch.data.manifest import MANIFEST_SCHEMAS, write_parquet

    images_dir = root / "raw" / "Image"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    rows = []
    for i in range(count):
        name = f"s{i}.jpg"
        pixels = np.roll(base, 7 * i, axis=1)  # cheap variety; decoding cost is what matters
        Image.fromarray(pixels).save(images_dir / name, quality=90)
        rows.append(
            dict(
                image_id=i,
                image_name=name,
                path=f"Image/{name}",
                width=width,
                height=height,
                split="test",
            )
        )
    manifests = root / "manifests"
    tables = {name: [] for name in MANIFEST_SCHEMAS}
    tables["images"] = rows
    for name, schema in MANIFEST_SCHEMAS.items():
        write_parquet(
            pa.Table.from_pylist(tables[name], schema=schema), manifests / f"{name}.parquet"
        )
    (manifests / "dataset.json").write_text(json.dumps({"name": "bench", "root": "../raw"}))
    return manifests


def run_once(
    images: int,
    device: str,
    backbone: str,
    min_size: int,
    max_size: int,
    size: tuple[int, int],
    batch_size: int,
) -> dict:
    """One extraction in this process; returns its extraction.json plus peak memory."""
    import torch

    from psearch.config import load_params, to_dict
    from psearch.inference.extract import extract
    from psearch.models.io import save_model
    from psearch.models.joint import build_joint_net

    overrides = [
        f"model.backbone={backbone}",
        f"model.min_size={min_size}",
        f"model.max_size={max_size}",
        f"extract.device={device}",
        f"extract.batch_size={batch_size}",
        "extract.num_workers=2",
        "tracking.enabled=false",
        # One test view, as the paper and the figures in benchmarks/README.md (the demo's six
        # views cost about 2.5 x per image: docs/extraction-and-search.md#test-time-views).
        "model.test_scale_factors=[]",
        "model.test_flip=false",
    ]
    params = load_params(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifests = write_gallery(tmp, images, *size)
        torch.manual_seed(0)
        net = build_joint_net(10, loss=to_dict(params.train.loss), **to_dict(params.model))
        model = save_model(tmp / "model.pt", net)
        if device == "cuda":  # warm up kernels and autotuning outside the timed run
            extract(manifests, str(model), tmp / "warmup", params)
            torch.cuda.reset_peak_memory_stats()
        info = extract(manifests, str(model), tmp / "dets", params)
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info["workers_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return info


def run_child(**kwargs) -> dict:
    """run_once in a fresh process, so peak memory is that run's alone."""
    return run_in_child("bench_extract", kwargs)


def run_in_child(module: str, kwargs: dict) -> dict:
    """`module`.run_once(**kwargs) in a fresh Python (benchmarks/ on its path); its result."""
    code = (
        "import importlib, json, sys; sys.path.insert(0, sys.argv[3]); "
        "run_once = importlib.import_module(sys.argv[1]).run_once; "
        "print(json.dumps(run_once(**json.loads(sys.argv[2]))))"
    )
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", code, module, json.dumps(kwargs), here],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{module}.run_once({kwargs}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-images", type=int, nargs="+", default=[24, 96])
    parser.add_argument("--gpu-images", type=int, default=400)
    parser.add_argument("--gpu-batch-size", type=int, default=8)
    args = parser.parse_args()

    print("CPU: small backbone, 400x300 scenes resized to 288x384, batch 4, 2 loader workers")
    for count in args.cpu_images:
        info = run_child(
            images=count,
            device="cpu",
            backbone="small",
            min_size=288,
            max_size=480,
            size=(300, 400),
            batch_size=4,
        )
        print(
            f"  {count:5d} images: {info['images_per_s']:6.2f} images/s, peak RSS "
            f"{info['peak_rss_mib']:.0f} MiB (loader workers {info['workers_peak_rss_mib']:.0f} MiB)"
        )

    import torch

    if not torch.cuda.is_available():
        print("GPU: skipped (no CUDA device on this machine)")
        return
    info = run_child(
        images=args.gpu_images,
        device="cuda",
        backbone="resnet50",
        min_size=900,
        max_size=1500,
        size=(600, 800),
        batch_size=args.gpu_batch_size,
    )
    print(
        f"GPU: {info['gpu']}: ResNet-50, 800x600 scenes resized to 900x1200, bf16 autocast, "
        f"batch {args.gpu_batch_size}: {info['images_per_s']:.1f} images/s over "
        f"{info['images']} images (target >= 60), peak GPU memory {info['gpu_peak_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
