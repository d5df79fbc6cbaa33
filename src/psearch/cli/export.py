"""`psearch export` (argument parsing only; the work is in psearch.serving.export)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from psearch.cli.common import add_joint_model, load_params_from_args


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "export",
        parents=[common],
        help="write a joint model as ONNX or TorchScript (detector + features, query boxes)",
        description="Trace the joint model's test-time forward (image -> boxes, scores, "
        "features; plus features of given query boxes) to one file that onnxruntime, or "
        "torch + torchvision without psearch, runs on images of any size. Test-time settings "
        "come from the `model` section of the params. A model from MLflow gets the file "
        "logged to its run under export/.",
    )
    add_joint_model(p)
    p.add_argument("--format", dest="fmt", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="file to write")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    # lazy: torch takes seconds to import; keep `psearch --help` fast
    from psearch.serving.export import export

    params = load_params_from_args(args)
    print(json.dumps(export(args.model, args.fmt, args.out, params), indent=2))
    return 0
