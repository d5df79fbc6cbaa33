"""The report's figures as PNGs: Fig. 6 (RSS against the plain softmax: identity loss and
accuracy by training step, one column per number of training identities) and Fig. 7(b)
(search mAP and top-1 against gallery size, one line per run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from psearch.atomic import atomic_file  # noqa: E402

FIG6_FILE = "fig6_rss_vs_softmax.png"
FIG7B_FILE = "fig7b_gallery_size.png"
LOSSES = {"rss": "RSS (the paper)", "softmax": "plain softmax"}
RUN_OF_LOSS = {"rss": "joint", "softmax": "softmax"}  # psearch.experiments.paper's labels
CURVES = (("loss_reid", "identity loss"), ("acc_reid", "identity accuracy"))
PREFERRED = "gallery_100"  # the paper's protocol for its tables


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def gallery_points(metrics: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(gallery size, mAP, top-1) for every sized gallery protocol in metrics.json."""
    points = []
    for name, scores in metrics.get("search", {}).items():
        size = name.removeprefix("gallery_")
        if name.startswith("gallery_") and size.isdigit() and int(size) > 0:
            points.append((int(size), scores["mAP"], scores["top1"]))
    return sorted(points)


def protocol_of(metrics: dict[str, Any]) -> str:
    """The protocol a table reports: gallery 100 (the paper's), else the smallest gallery."""
    search = metrics.get("search", {})
    if PREFERRED in search:
        return PREFERRED
    sized = gallery_points(metrics)
    return f"gallery_{sized[0][0]}" if sized else next(iter(search), PREFERRED)


def _final_map(leg: dict[str, Any], loss: str) -> str:
    run = leg["runs"].get(RUN_OF_LOSS[loss])
    if run is None:
        return ""
    protocol = protocol_of(run["metrics"])
    scores = run["metrics"].get("search", {}).get(protocol)
    return f", final mAP {100 * scores['mAP']:.1f}% ({protocol})" if scores else ""


def draw_fig6(legs: dict[str, dict[str, Any]], path: Path) -> None:
    """Identity loss (top) and accuracy (bottom) by step, a column per leg; each line's label
    gives its net's final search mAP."""
    columns = [leg for leg in legs.values() if {"rss", "softmax"} <= set(leg["trainings"])]
    width = max(1, len(columns))
    fig, axes = plt.subplots(2, width, figsize=(6.0 * width, 7.0), dpi=110, squeeze=False)
    for col, leg in enumerate(columns):
        for row, (key, label) in enumerate(CURVES):
            ax = axes[row][col]
            for loss, name in LOSSES.items():
                history = leg["trainings"][loss]["history"]
                points = [(h["step"], h[key]) for h in history if key in h]
                if points:
                    steps, values = zip(*points, strict=True)
                    shown = name + (_final_map(leg, loss) if row == 0 else "")
                    ax.plot(steps, values, marker="o", markersize=2, label=shown)
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.set_title(f"{leg['train_identities']} training identities", fontsize=10)
            ax.legend(fontsize=8)
    fig.suptitle("Fig. 6: RSS vs plain softmax (joint training)")
    fig.tight_layout()
    _save(fig, path)


def draw_fig7b(runs: dict[str, tuple[str, dict[str, Any]]], path: Path) -> None:
    """mAP (solid) and top-1 (dashed) against gallery size for each run {label: (name, metrics)}."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    sizes: set[int] = set()
    for name, metrics in runs.values():
        points = gallery_points(metrics)
        if not points:
            continue
        x = [p[0] for p in points]
        sizes.update(x)
        line = ax.plot(x, [100 * p[1] for p in points], "o-", label=f"{name} mAP")[0]
        ax.plot(
            x, [100 * p[2] for p in points], "s--", color=line.get_color(), label=f"{name} top-1"
        )
    if sizes:
        ax.set_xscale("log")
        ax.set_xticks(sorted(sizes), [str(s) for s in sorted(sizes)])
        ax.minorticks_off()
    ax.set_ylim(0, 100)
    ax.set_xlabel("gallery size")
    ax.set_ylabel("%")
    ax.set_title("Fig. 7(b): search accuracy vs gallery size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
