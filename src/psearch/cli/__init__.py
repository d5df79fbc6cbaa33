"""The `psearch` command line: argument parsing and dispatch only.

One module per command group adds its subcommands: data (synth, ingest), train (pretrain,
train), inference (extract, extract-merge, report, search), evaluation (evaluate), registry
(register, promote), serving (index, serve), export, recipes (config: the named recipes),
experiments (paper: the paper's experiments in one command) and pipeline (forwarded to the Kubeflow wing); common holds what they
share. Importing the command line stays light (no torch, mlflow or matplotlib, so `psearch
evaluate` and `--help` start fast): the handlers that run a torch stage import psearch.stages
when they run. User errors print one line, `error: ...`, and exit 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse

from psearch import __version__
from psearch.cli import (
    data,
    evaluation,
    experiments,
    export,
    inference,
    pipeline,
    recipes,
    registry,
    serving,
    train,
)
from psearch.cli.common import common_parser, run_handler
from psearch.tracking import dvc_stage

__all__ = ["build_parser", "main"]

# Each defines add_commands(subparsers, common); `psearch --help` lists them in this order.
COMMAND_GROUPS = [
    recipes,
    data,
    train,
    inference,
    evaluation,
    registry,
    serving,
    export,
    experiments,
    pipeline,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psearch",
        description="Person search: joint pedestrian detection and re-identification.",
    )
    parser.add_argument("--version", action="version", version=f"psearch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_parser()
    for group in COMMAND_GROUPS:
        group.add_commands(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under `dvc repro`, note the stage's times for the pipeline's MLflow run (psearch.tracking).
    return run_handler(args, dvc_stage(args.command))
