"""Evaluation plots: a DVC-plottable CSV always, and a PNG unless disabled.

The figures are the paper's: search mAP / top-1 against gallery size (Fig. 7b),
the CMC curve (top-k for k = 1..20) on gallery 100, and the detection
precision-recall curve (Fig. 5). matplotlib is imported only when PNGs are drawn.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from psearch.evaluation.detection import PRCurve

CMC_MAX_K = 20
PR_MAX_POINTS = 400  # the CSV keeps DVC's plot light; the PNG draws every threshold


def _write_csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def cmc(rank: np.ndarray, max_k: int = CMC_MAX_K) -> np.ndarray:
    """top-k accuracy for k = 1..max_k from 1-based ranks (0 = no correct match)."""
    ks = np.arange(1, max_k + 1)
    if len(rank) == 0:
        return np.zeros(max_k)
    return ((rank[None, :] >= 1) & (rank[None, :] <= ks[:, None])).mean(axis=1)


def _figure(plt, title: str, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def write_plots(
    out: Path,
    gallery: list[tuple[int, dict]],
    cmc_protocol: str | None,
    cmc_values: np.ndarray | None,
    pr: PRCurve,
    detection_ap: float,
    png: bool = True,
) -> list[str]:
    """Write the plot files under `out` (a directory); return their names."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sized = [(size, m) for size, m in gallery if size > 0]
    if sized:
        rows = [(size, f"{m['mAP']:.6f}", f"{m['top1']:.6f}") for size, m in sized]
        _write_csv(out / "gallery_size.csv", ["gallery_size", "mAP", "top1"], rows)
        written.append("gallery_size.csv")
    if cmc_values is not None:
        rows = [(k, f"{v:.6f}") for k, v in enumerate(cmc_values, start=1)]
        _write_csv(out / "cmc.csv", ["k", "top_k"], rows)
        written.append("cmc.csv")
    step = max(1, int(np.ceil(len(pr.recall) / PR_MAX_POINTS)))
    keep = (
        np.unique(np.r_[np.arange(0, len(pr.recall), step), len(pr.recall) - 1])
        if len(pr.recall)
        else []
    )
    rows = [
        (f"{pr.recall[i]:.6f}", f"{pr.precision[i]:.6f}", f"{pr.thresholds[i]:.6f}") for i in keep
    ]
    _write_csv(out / "detection_pr.csv", ["recall", "precision", "threshold"], rows)
    written.append("detection_pr.csv")
    if not png:
        return written

    import matplotlib  # lazy: a second to import; `evaluate.plots: false` never needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above; after the backend is chosen

    if sized:
        sizes = [s for s, _ in sized]
        fig, ax = _figure(plt, "Search accuracy vs gallery size", "gallery size", "mAP / top-1 (%)")
        ax.plot(sizes, [100 * m["mAP"] for _, m in sized], "o-", label="mAP")
        ax.plot(sizes, [100 * m["top1"] for _, m in sized], "s--", label="top-1")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gallery_size.png")
        plt.close(fig)
        written.append("gallery_size.png")
    if cmc_values is not None:
        ks = np.arange(1, len(cmc_values) + 1)
        fig, ax = _figure(plt, f"CMC ({cmc_protocol})", "rank k", "top-k accuracy (%)")
        ax.plot(ks, 100 * cmc_values, "o-", markersize=3)
        ax.set_xticks([1, 5, 10, 15, 20])
        ax.set_xlim(1, len(cmc_values))
        ax.set_ylim(0, 100)
        fig.tight_layout()
        fig.savefig(out / "cmc.png")
        plt.close(fig)
        written.append("cmc.png")
    fig, ax = _figure(plt, "Pedestrian detection", "recall", "precision")
    ax.plot(pr.recall, pr.precision, label=f"AP = {100 * detection_ap:.1f}%")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "detection_pr.png")
    plt.close(fig)
    written.append("detection_pr.png")
    return written
