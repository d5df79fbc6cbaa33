"""Model figures: size and inference speed per backbone, and the identity losses' cost.

1. Parameters and eval-mode forward latency (detections + features for one image, and
   query features for 5 given boxes) of the joint net per backbone, on CPU at the params'
   default resolution (shorter side 288, longer side <= 480), random init.
2. Forward + backward time of the identity losses at CUHK-SYSU's scale (C = 5532 training
   identities, 256 RoI features of D = 256): random sampling softmax (K = 100), the full
   C+1 softmax, and OIM (queue 5000). This is the cost the paper's RSS is about.

Usage: python benchmarks/bench_models.py [--threads 2] [--repeats 5] [--only backbones|losses]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from psearch.config import LossConfig
from psearch.models.joint import build_joint_net
from psearch.models.losses import build_reid_loss

CUHK_SYSU_IDENTITIES = 5532
RSS_K = 100


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_backbones(repeats: int) -> None:
    print("joint net, CPU, eval mode, one 288x384 image, random init")
    print(f"{'backbone':<10} {'params (M)':>10} {'detect (s)':>11} {'query x5 (s)':>13}")
    image = [torch.rand(3, 288, 384)]
    boxes = [torch.tensor([[20.0 + 40 * i, 30.0, 60.0 + 40 * i, 200.0] for i in range(5)])]
    for kind in ("small", "resnet50", "vgg16"):
        torch.manual_seed(0)
        net = build_joint_net(100, backbone=kind).eval()
        params = sum(p.numel() for p in net.parameters()) / 1e6
        with torch.no_grad():
            detect = timed(lambda net=net: net(image), repeats)
            query = timed(lambda net=net: net.query_features(image, boxes), repeats)
        print(f"{kind:<10} {params:>10.1f} {detect:>11.3f} {query:>13.3f}")


def bench_losses(repeats: int) -> None:
    print(f"\nidentity loss, C={CUHK_SYSU_IDENTITIES}, N=256 features of D=256, forward+backward")
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(256, 256, generator=generator), dim=1)
    labels = torch.randint(0, CUHK_SYSU_IDENTITIES + 1, (256,), generator=generator)
    labels[::4] = -1  # unlabelled persons
    for name, cfg in (
        (f"rss (K={RSS_K})", LossConfig(reid_loss="rss", rss_k=RSS_K)),
        ("softmax", LossConfig(reid_loss="softmax")),
        ("oim", LossConfig(reid_loss="oim", oim_queue_size=5000)),
    ):
        torch.manual_seed(0)
        loss = build_reid_loss(
            **dataclasses.asdict(cfg), num_classes=CUHK_SYSU_IDENTITIES, feat_dim=256
        ).train()

        def step(loss=loss):
            x = features.clone().requires_grad_(True)
            value, _ = loss(x, labels)
            value.backward()

        print(f"{name:<12} {timed(step, repeats) * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["backbones", "losses"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, median of {args.repeats}")
    if args.only in (None, "backbones"):
        bench_backbones(args.repeats)
    if args.only in (None, "losses"):
        bench_losses(args.repeats)


if __name__ == "__main__":
    main()
