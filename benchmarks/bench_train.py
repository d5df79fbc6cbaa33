"""Training throughput: joint-net images/s and peak memory per backbone.

CPU: every backbone at the demo resolution (params defaults: shorter side
model.min_size, about 300 px), a handful of steps each through the real training
engine (SGD, clipping, the loss dict of the joint net) on random scenes with five
people each. CUDA (when available): ResNet-50 and VGG16 at CUHK-SYSU resolution
(shorter side 900) with bf16 autocast, plus peak GPU memory and the GPU's name.

Each measurement runs in its own process so peak RSS belongs to one backbone.
Usage: python benchmarks/bench_train.py [--steps-scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

# (backbone, device, min_size, max_size, timed steps)
CPU_CASES = [
    ("small", "cpu", 288, 480, 8),
    ("resnet50", "cpu", 288, 480, 2),
    ("vgg16", "cpu", 288, 480, 2),
]
GPU_CASES = [("resnet50", "cuda", 900, 1500, 20), ("vgg16", "cuda", 900, 1500, 20)]
WARMUP_STEPS = 1


def measure(backbone: str, device: str, min_size: int, max_size: int, steps: int) -> dict:
    """Train `steps` (+ warm-up) iterations of batch 2 and report the speed and memory."""
    import torch
    from torch.utils.data import Dataset

    from psearch.config import Params, to_dict
    from psearch.data.loaders import list_collate
    from psearch.models.joint import build_joint_net
    from psearch.train.engine import Engine
    from psearch.train.joint import forward_scenes

    class RandomScenes(Dataset):
        """Scenes of the demo's 4:3 shape with five person-shaped boxes, 2 labelled."""

        def __init__(self, n: int, width: int, height: int) -> None:
            self.n, self.width, self.height = n, width, height

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, key):
            index = key[1] if isinstance(key, tuple) else key
            g = torch.Generator().manual_seed(index)
            image = torch.rand(3, self.height, self.width, generator=g)
            h = self.height * (0.3 + 0.4 * torch.rand(5, generator=g))
            w = h * 0.4
            x1 = (self.width - w) * torch.rand(5, generator=g)
            y1 = (self.height - h) * torch.rand(5, generator=g)
            boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1)
            labels = torch.tensor([index % 50, (index + 7) % 50, -1, -1, -1])
            return image, {"boxes": boxes, "labels": labels, "image_id": index}

    params = Params()
    params.model.backbone = backbone
    params.model.min_size, params.model.max_size = min_size, max_size
    cfg = params.train
    cfg.device, cfg.num_workers, cfg.amp = device, 0, "bf16"
    cfg.max_steps = WARMUP_STEPS + steps
    torch.manual_seed(0)
    model = build_joint_net(50, loss=to_dict(cfg.loss), **to_dict(params.model))
    scenes = RandomScenes(2 * (WARMUP_STEPS + steps), min_size * 4 // 3, min_size)
    engine = Engine(model, scenes, forward_scenes, cfg, None, "bench", list_collate, progress=False)
    cfg.max_steps = WARMUP_STEPS
    engine.total_steps = WARMUP_STEPS
    engine.fit()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    engine.total_steps = WARMUP_STEPS + steps
    result = engine.fit()
    if device == "cuda":
        torch.cuda.synchronize()
    out = {
        "backbone": backbone,
        "device": device,
        "min_size": min_size,
        "steps": steps,
        "images_per_s": 2 * steps / result.seconds,
        "seconds_per_step": result.seconds / steps,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
        out["amp"] = "bf16"
    return out


def run_case(case: tuple, scale: float) -> dict:
    backbone, device, min_size, max_size, steps = case
    steps = max(1, round(steps * scale))
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import bench_train as b; "
        f"print(json.dumps(b.measure({backbone!r}, {device!r}, {min_size}, {max_size}, {steps})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{backbone}/{device} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count")
    args = parser.parse_args()
    import torch

    cases = list(CPU_CASES)
    if torch.cuda.is_available():
        cases += GPU_CASES
    print(
        f"{'backbone':<9} {'device':<6} {'short side':>10} {'steps':>5} {'img/s':>7} "
        f"{'s/step':>7} {'peak RSS MiB':>12} {'peak GPU MiB':>12}"
    )
    for case in cases:
        r = run_case(case, args.steps_scale)
        gpu = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
        print(
            f"{r['backbone']:<9} {r['device']:<6} {r['min_size']:>10} {r['steps']:>5} "
            f"{r['images_per_s']:>7.2f} {r['seconds_per_step']:>7.2f} "
            f"{r['peak_rss_mib']:>12.0f} {gpu:>12}"
            + (f"  ({r['gpu']}, AMP bf16)" if "gpu" in r else "")
        )
    if not torch.cuda.is_available():
        print("GPU part skipped: torch.cuda.is_available() is False on this machine")


if __name__ == "__main__":
    main()
