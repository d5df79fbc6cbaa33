"""What every `psearch` subcommand shares: the common options (--params, --set, --debug),
the output option, adding a subcommand, reading the params, flags that override a params
section, printing a JSON summary, and the error contract (one line `error: ...`, exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from psearch.config import DataConfig, Params, load_params
from psearch.errors import PsearchError

Handler = Callable[[argparse.Namespace], int]
# The synthetic presets, as data.preset's type lists them (synth and paper offer them).
PRESETS = list(typing.get_args(typing.get_type_hints(DataConfig)["preset"]))


def common_parser() -> argparse.ArgumentParser:
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


def add_command(
    subparsers, common: argparse.ArgumentParser, name: str, run: Handler, **texts: str
) -> argparse.ArgumentParser:
    """Subcommand `name` with the common options, run by `run`. Its help and description
    (`texts`, when not given) are `run`'s docstring: the first paragraph for `psearch --help`,
    the rest for `psearch NAME --help`, each on one line (argparse refills them)."""
    summary, _, description = (run.__doc__ or "").partition("\n\n")
    from_doc = {"help": " ".join(summary.split()), "description": " ".join(description.split())}
    texts = {**{key: text for key, text in from_doc.items() if text}, **texts}
    parser = subparsers.add_parser(name, parents=[common], **texts)
    parser.set_defaults(func=run)
    return parser


def add_manifests(parser: argparse.ArgumentParser) -> None:
    """--manifests DIR: the manifests directory psearch ingest wrote."""
    parser.add_argument(
        "--manifests", required=True, metavar="DIR", help="output of psearch ingest"
    )


def add_joint_model(parser: argparse.ArgumentParser) -> None:
    """--model MODEL: a joint model file, its directory, or an MLflow URI."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="joint model: model.pt, its directory, or an MLflow URI (runs:/ID/model, "
        "models:/person-search@champion)",
    )


def add_out(
    parser: argparse.ArgumentParser, metavar: str, help: str, required: bool = True, **kwargs: Any
) -> None:
    """--out: where the command writes (a directory or a file, named by `metavar`)."""
    parser.add_argument("--out", required=required, metavar=metavar, help=help, **kwargs)


def load_params_from_args(args: argparse.Namespace) -> Params:
    """The validated Params for a parsed command line (params file + --set)."""
    return load_params(getattr(args, "params", None), getattr(args, "overrides", []))


def with_flags(section: Any, **flags: Any) -> Any:
    """A params section with each flag given on the command line (not None) put in."""
    return dataclasses.replace(section, **{k: v for k, v in flags.items() if v is not None})


def print_summary(info: dict[str, Any]) -> None:
    """A stage's summary as indented JSON on stdout (nothing when empty: torchrun's other ranks)."""
    if info:
        print(json.dumps(info, indent=2, default=str), file=sys.stdout)


def run_handler(
    args: argparse.Namespace, around: AbstractContextManager[Any] = nullcontext()
) -> int:
    """Run the parsed command inside `around`; every failure becomes one line `error: ...`
    (--debug or PSEARCH_DEBUG=1: the traceback instead). A PsearchError (bad input) exits
    with its code (2); an OSError (a read-only or full disk, a path through a file) names the
    path and exits 2; anything else is a bug: "internal error", exit 1."""
    debug = args.debug or os.environ.get("PSEARCH_DEBUG") == "1"
    try:
        with around:  # an error leaves `around` by the exception, before it is reported
            result = args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        message, code = describe_failure(exc)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return code
    return int(result or 0)


def describe_failure(exc: Exception) -> tuple[str, int]:
    """(the one-line message, the exit code) for an exception that ended a command."""
    if isinstance(exc, PsearchError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):  # the environment, not a bug: say which path and why
        reason = exc.strerror or str(exc) or type(exc).__name__
        return (f"{exc.filename}: {reason}" if exc.filename is not None else reason), 2
    text = " ".join(str(exc).split())[:300]
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"internal error ({detail}); re-run with --debug for the traceback", 1
