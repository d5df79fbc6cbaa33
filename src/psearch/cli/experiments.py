"""`psearch paper`: the paper's experiments in one command (psearch.experiments)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psearch.cli.common import PRESETS, add_command, load_params_from_args


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "paper", _paper)
    p.add_argument(
        "--out", default="runs/paper", metavar="DIR", help="report directory (default: runs/paper)"
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="synthetic dataset to run on (default: data.preset; paper-demo has galleries "
        "50-500 for Fig. 7(b))",
    )
    data.add_argument(
        "--manifests", metavar="DIR", default=None, help="instead: manifests of psearch ingest"
    )
    p.add_argument(
        "--more-ids",
        choices=[*PRESETS, "none"],
        default="many-ids",
        help="preset of Fig. 6's second, shorter leg at more training identities (default: "
        "many-ids, 3,000 identities); none: only the main dataset",
    )
    p.add_argument(
        "--more-ids-steps",
        type=int,
        default=300,
        metavar="N",
        help="pretrain and train iterations of that leg (default 300)",
    )
    p.add_argument("--no-cbgm", action="store_true", help="skip the CBGM re-ranked evaluations")


def _paper(args: argparse.Namespace) -> int:
    """run the paper's experiments and write a report (Tables 2-3, Figs. 6 and 7b)

    Pretrains IDNet, trains the joint net with RSS, with the plain softmax, and the detector
    alone (identity loss off: the paper's Deep detector), extracts and evaluates the Table 2
    cells (joint; Deep + IDNet; GT boxes + IDNet / joint features), with and without CBGM, and
    a second shorter leg at more identities for Fig. 6. Writes OUT/report.md, results.json and
    the figures; each step's output is under OUT/steps/, keyed on its inputs and params, so a
    re-run skips finished steps. Settings: params.yaml (+ --set) for every stage.
    """
    params = load_params_from_args(args)
    # lazy: torch, mlflow and matplotlib take seconds to import; --help must not pay them
    from psearch.experiments.paper import PaperOptions, run_paper
    from psearch.experiments.report import write_report

    options = PaperOptions(
        out=Path(args.out),
        preset=args.preset,
        manifests=Path(args.manifests) if args.manifests else None,
        more_ids=None if args.more_ids == "none" else args.more_ids,
        more_ids_steps=args.more_ids_steps,
        cbgm=not args.no_cbgm,
    )
    results = run_paper(params, options)
    path = write_report(results, options.out)
    print(path.read_text(), end="")
    print(f"paper: report written to {path}", file=sys.stderr)
    return 0
