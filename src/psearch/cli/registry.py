"""`psearch register` and `psearch promote`: the MLflow model registry from the command line.

Light: psearch.registry (what psearch.stages re-exports for these stages) imports mlflow only
when it runs, and never torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from psearch.atomic import write_text_atomic
from psearch.cli.common import add_command, add_out, load_params_from_args
from psearch.errors import PsearchError
from psearch.registry import promote, register
from psearch.tracking import finish_pipeline


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "register", _register)
    p.add_argument("--model", required=True, metavar="DIR", help="training output (run.json)")
    p.add_argument("--metrics", required=True, metavar="FILE", help="the evaluation's metrics.json")
    p.add_argument(
        "--promote", action="store_true", help="then promote it if it beats the champion"
    )
    add_out(p, "FILE", "write the outcome as JSON (the DVC stage's out)", required=False)

    p = add_command(subparsers, common, "promote", _promote)
    p.add_argument(
        "--metric", default=None, help="metric to compare (default: register.metric in params)"
    )
    p.add_argument("--version", default=None, help="candidate version (default: the latest)")
    p.add_argument(
        "--force", action="store_true", help="promote without comparing (still recorded)"
    )
    p.add_argument(
        "--rollback", action="store_true", help="move the alias back to the previous champion"
    )


def _register(args: argparse.Namespace) -> int:
    """register a trained model with its metrics in the MLflow model registry

    Register the model a training run logged (DIR/run.json) as a new version of
    register.model_name, its metrics as version tags; log the metrics and plots to that
    training run. With --promote, also move the champion alias when it is better.
    """
    params = load_params_from_args(args)
    result = register(Path(args.model), Path(args.metrics), params)
    print(
        f"registered {result['model_name']} version {result['version']} "
        f"({result['model_uri']}, {params.register.metric} = "
        f"{result['metrics'].get(params.register.metric, float('nan')):.4f})"
    )
    if args.promote:
        result["promotion"] = promote(params, version=result["version"])
        print(result["promotion"]["decision"])
    # Under `dvc repro` this is the last stage: it closes the pipeline's MLflow run.
    result["pipeline_run_id"] = finish_pipeline(params) or result["pipeline_run_id"]
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def _promote(args: argparse.Namespace) -> int:
    """move the champion alias to a better model version, or roll it back

    Move the register.alias alias to the candidate (the latest version, or --version) only
    when it beats the current champion on --metric (strictly greater); --rollback moves it
    back to the previous champion.
    """
    if args.rollback and (args.force or args.version is not None):
        raise PsearchError("--rollback takes neither --force nor --version")
    params = load_params_from_args(args)
    result = promote(
        params, metric=args.metric, force=args.force, rollback=args.rollback, version=args.version
    )
    print(result["decision"])
    return 0
