"""`psearch evaluate`: flags, the params `evaluate` section, and a compact metrics table.

Light on purpose: numpy and pyarrow are imported by the handler, matplotlib only
when PNG plots are drawn, and never torch, sklearn or mlflow.
"""

from __future__ import annotations

import argparse
import dataclasses

from psearch.errors import PsearchError


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--gallery-sizes {text!r}: expected comma-separated integers, e.g. 50,100,-1"
        ) from None


def add_commands(subparsers, common) -> None:
    p = subparsers.add_parser(
        "evaluate",
        parents=[common],
        help="score detections and features: search mAP/top-k per protocol, detection AP/recall",
        description=(
            "Score DETECTIONS (gallery_detections.parquet, query_features.parquet) against every "
            "gallery protocol in MANIFESTS; writes OUT/metrics.json, per_query.parquet, "
            "worst_queries.json and plots/. Flags override the params file's evaluate section."
        ),
    )
    p.add_argument("--manifests", required=True, metavar="DIR", help="output of psearch ingest")
    p.add_argument("--detections", required=True, metavar="DIR", help="output of psearch extract")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the results")
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
    p.add_argument("--no-plots", action="store_true", help="write plot CSVs only, no PNGs")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from psearch.cli import load_params_from_args

    cfg = load_params_from_args(args).evaluate
    changes = {
        "det_thresh": args.det_thresh,
        "det_eval_thresh": args.det_eval_thresh,
        "gallery_sizes": args.gallery_sizes,
        "cross_camera": args.cross_camera,
        "plots": False if args.no_plots else None,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
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
    from psearch import stages

    metrics = stages.evaluate(args.manifests, args.detections, args.out, _config(args))
    print(format_table(metrics))
    print(f"wrote {args.out}/metrics.json")
    return 0
