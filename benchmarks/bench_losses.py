"""Identity losses' cost as the number of identities C grows: RSS vs softmax vs OIM.

Forward + backward of each loss on N = 256 RoI features of D = 256 (a quarter unlabelled,
the rest uniform over the C identities and the background), at C = 5,532 (CUHK-SYSU's
training identities), 10x and 100x that. The random sampling softmax (K = 100) should be the
cheapest at large C: that is its point in the paper. Two reference rows run the
implementations issue #13 replaced, in the same process: RSS drawing an [N, C+1] random
matrix, taking its top-K and running the full classifier for the logged accuracy; and the
OIM lookup-table update as a Python loop over samples (timed alone, with the duplicate
labels of a joint-training batch: 16 identities with 4-16 RoIs each).

Usage: python benchmarks/bench_losses.py [--device cpu|cuda] [--threads 1] [--repeats 3]
                                         [--classes 5532 55320 553200]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from psearch.models.losses import OIMLoss, RandomSamplingSoftmaxLoss, build_reid_loss

N, FEAT_DIM, RSS_K, OIM_QUEUE = 256, 256, 100, 5000


class LegacyRSS(RandomSamplingSoftmaxLoss):
    """RSS as it was before issue #13: O(N * C) sampling and a full-classifier accuracy."""

    def sample_classes(self, targets: torch.Tensor) -> torch.Tensor:
        scores = torch.rand(targets.numel(), self.num_classes + 1, device=targets.device)
        scores[:, self.num_classes] = 2.0
        scores[torch.arange(targets.numel(), device=targets.device), targets] = 3.0
        return scores.topk(self.k, dim=1).indices

    def forward(self, features, labels):
        loss, _ = super().forward(features, labels)
        keep = labels != -1
        with torch.no_grad():
            accuracy = self.classifier(self.scale * features[keep]).argmax(1) == labels[keep]
        return loss, accuracy.float().mean()


def legacy_oim_update(loss: OIMLoss, features: torch.Tensor, labels: torch.Tensor) -> None:
    """The table update before issue #13: one indexed write per sample."""
    for feature, label in zip(features, labels.tolist(), strict=True):
        if 0 <= label < loss.num_classes:
            entry = loss.momentum * loss.lut[label] + (1.0 - loss.momentum) * feature
            loss.lut[label] = F.normalize(entry, dim=0)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of `repeats` calls after one warm-up call.

    The CPU time is the steadier figure on a shared machine: other jobs stretch the wall
    time (and oversubscribed OpenMP threads spin), not the work this process does.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def batch(num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(N, FEAT_DIM, generator=generator), dim=1)
    labels = torch.randint(0, num_classes + 1, (N,), generator=generator)
    labels[::4] = -1  # unlabelled persons
    return features.to(device), labels.to(device)


def losses_for(num_classes: int, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    made = {
        f"rss (K={RSS_K})": build_reid_loss(
            reid_loss="rss", num_classes=num_classes, feat_dim=FEAT_DIM, rss_k=RSS_K
        ),
        "softmax (C+1)": build_reid_loss(
            reid_loss="softmax", num_classes=num_classes, feat_dim=FEAT_DIM
        ),
        f"oim (queue {OIM_QUEUE})": build_reid_loss(
            reid_loss="oim", num_classes=num_classes, feat_dim=FEAT_DIM, oim_queue_size=OIM_QUEUE
        ),
        "rss before #13": LegacyRSS(num_classes, FEAT_DIM, RSS_K, scale=30.0),
    }
    return {name: loss.to(device).train() for name, loss in made.items()}


def step_time(loss: torch.nn.Module, features, labels, repeats: int, device):
    def step() -> None:
        loss.zero_grad(set_to_none=True)
        x = features.clone().requires_grad_(True)
        value, accuracy = loss(x, labels)
        value.backward()
        float(accuracy)  # what a trainer logging the accuracy waits for

    return timed(step, repeats, device)


def bench_losses(classes: list[int], repeats: int, device: torch.device) -> None:
    print(f"\nforward + backward, N={N} features of D={FEAT_DIM}: ms wall (ms CPU), median")
    rows: dict[str, list[tuple[float, float]]] = {}
    for num_classes in classes:
        features, labels = batch(num_classes, device)
        for name, loss in losses_for(num_classes, device).items():
            rows.setdefault(name, []).append(step_time(loss, features, labels, repeats, device))
            del loss
    header = "".join(f"{'C=' + format(c, ','):>20}" for c in classes)
    print(f"{'loss':<18}{header}")
    for name, values in rows.items():
        cells = "".join(f"{f'{w * 1000:.1f} ({c * 1000:.1f})':>20}" for w, c in values)
        print(f"{name:<18}{cells}")


def bench_oim_update(repeats: int, device: torch.device) -> None:
    num_classes = 5532
    generator = torch.Generator().manual_seed(1)
    identities = torch.randperm(num_classes, generator=generator)[:16]
    per_identity = torch.randint(4, 17, (16,), generator=generator)
    labels = torch.full((N,), num_classes)  # background RoIs
    labelled = identities.repeat_interleave(per_identity)
    labels[: len(labelled)] = labelled
    labels = labels[torch.randperm(N, generator=generator)].to(device)
    features = F.normalize(torch.randn(N, FEAT_DIM, generator=generator), dim=1).to(device)
    loss = OIMLoss(num_classes, FEAT_DIM, OIM_QUEUE, momentum=0.5, scalar=30.0).to(device)
    before, _ = timed(lambda: legacy_oim_update(loss, features, labels), repeats, device)
    keep = (labels >= 0) & (labels < num_classes)
    after, _ = timed(lambda: loss._update_table(features[keep], labels[keep]), repeats, device)
    print(
        f"\nOIM table update, N={N} RoIs ({len(labelled)} of 16 identities, the rest background):"
        f" loop over samples {before * 1000:.2f} ms, vectorised {after * 1000:.2f} ms (wall)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, nargs="+", default=[5532, 55320, 553200])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {args.threads} CPU threads")
    bench_losses(args.classes, args.repeats, device)
    bench_oim_update(args.repeats, device)


if __name__ == "__main__":
    main()
