"""The `psearch` command line: argument parsing and dispatch only.

Each subsystem registers its subcommands from a light `commands` module (no
torch import at module level, so `psearch evaluate` starts fast); the work is
done by the stage functions in `psearch.stages`. User errors print one line,
`error: ...`, and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from psearch import __version__
from psearch.errors import PsearchError
from psearch.tracking import dvc_stage

# Every module here defines add_commands(subparsers, common) (see _common_parser).
COMMAND_MODULES = [
    "psearch.data.commands",  # synth, ingest
    "psearch.train.commands",  # pretrain, train
    "psearch.inference.commands",  # extract, extract-merge, report, search
    "psearch.evaluation.commands",  # evaluate
    "psearch.registry_commands",  # register, promote
    "psearch.serving.commands",  # export
    "psearch.pipeline.commands",  # pipeline compile | run-local | submit | prepare
]


def _common_parser() -> argparse.ArgumentParser:
    """Options every stage subcommand takes (used as an argparse parent)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params",
        metavar="FILE",
        default=None,
        help="params file (default: ./params.yaml when present, else built-in defaults)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        help="override one parameter (repeatable), e.g. --set train.lr=0.01",
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    return common


def load_params_from_args(args: argparse.Namespace):
    """The validated Params for a parsed command line (params file + --set)."""
    from psearch.config import load_params

    return load_params(getattr(args, "params", None), getattr(args, "overrides", []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psearch",
        description="Person search: joint pedestrian detection and re-identification.",
    )
    parser.add_argument("--version", action="version", version=f"psearch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_parser()
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).add_commands(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("PSEARCH_DEBUG") == "1"
    try:
        # Under `dvc repro`, note the stage's times for the pipeline's MLflow run (tracking.py).
        with dvc_stage(args.command):
            result = args.func(args)
    except PsearchError as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
