"""`psearch evaluate`: flags, the params `evaluate` section, and a compact metrics table.

Light on purpose: it calls psearch.evaluation directly (numpy and pyarrow; matplotlib only
when PNG plots are drawn), never psearch.stages, so no torch, sklearn or mlflow is imported.
"""

from __future__ import annotations

import argparse

from psearch.cli.common import (
    add_command,
    add_manifests,
    add_out,
    load_params_from_args,
    with_flags,
)
from psearch.config import EvaluateConfig
from psearch.errors import PsearchError
from psearch.evaluation.run import evaluate


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--gallery-sizes {text!r}: expected comma-separated integers, e.g. 50,100,-1"
        ) from None


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "evaluate", run)
    add_manifests(p)
    p.add_argument("--detections", required=True, metavar="DIR", help="output of psearch extract")
    add_out(p, "DIR", "where to write the results")
    p.add_argument("--det-thresh", type=float, help="min detection score for search (0.5)")
    p.add_argument(
        "--det-eval-thresh", type=float, help="min detection score for detection metrics (0.01)"
    )
    p.add_argument(
        "--gallery-sizes",
        type=_sizes,
        metavar="N,N,...",
        help="protocols to score, e.g. 50,100,-1 (default: every size in the manifests)",
    )
    p.add_argument(
        "--cross-camera",
        action="store_true",
        default=None,
        help="gallery = other cameras than the query's only (PRW practice)",
    )
    p.add_argument(
        "--cbgm",
        action="store_true",
        default=None,
        help="re-rank with the other people of the query and gallery images (SeqNet's CBGM)",
    )
    p.add_argument("--no-plots", action="store_true", help="write plot CSVs only, no PNGs")


def _config(args: argparse.Namespace) -> EvaluateConfig:
    cfg = with_flags(
        load_params_from_args(args).evaluate,
        det_thresh=args.det_thresh,
        det_eval_thresh=args.det_eval_thresh,
        gallery_sizes=args.gallery_sizes,
        cross_camera=args.cross_camera,
        cbgm=args.cbgm,
        plots=False if args.no_plots else None,
    )
    if cfg.gallery_sizes is not None and not cfg.gallery_sizes:
        raise PsearchError("--gallery-sizes: no size given")
    return cfg


def format_table(metrics: dict) -> str:
    """The search metrics as a small fixed-width table, then the detection line."""
    lines = [f"{'protocol':<16}{'queries':>8}{'mAP':>8}{'top-1':>8}{'top-5':>8}{'top-10':>8}"]
    for name, m in metrics["search"].items():
        values = "".join(f"{100 * m[k]:>8.2f}" for k in ("mAP", "top1", "top5", "top10"))
        lines.append(f"{name:<16}{m['queries']:>8}{values}")
    d = metrics["detection"]
    lines.append(
        f"detection: AP {100 * d['ap']:.2f}  recall {100 * d['recall']:.2f}  "
        f"labelled recall {100 * d['labeled_recall']:.2f}  (%)"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """score detections and features: search mAP/top-k per protocol, detection AP/recall

    Score DETECTIONS (gallery_detections.parquet, query_features.parquet) against every
    gallery protocol in MANIFESTS; writes OUT/metrics.json, per_query.parquet,
    worst_queries.json and plots/. Flags override the params file's evaluate section.
    """
    metrics = evaluate(args.manifests, args.detections, args.out, _config(args))
    print(format_table(metrics))
    print(f"wrote {args.out}/metrics.json")
    return 0
