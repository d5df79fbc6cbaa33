"""`psearch pipeline compile | run-local | submit | prepare`: the Kubeflow pipeline.

The orchestration wing (the top-level `pipelines` package) owns these actions; the library
never imports it, so this command runs `python -m pipelines ACTION ARGS` as a child process
in the same terminal and exits with its status. The actions' options and help are theirs
(`psearch pipeline ACTION --help` forwards too); only the list of actions is here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ACTIONS = {
    "compile": "compile the DAG to a pipeline YAML (KFP IR)",
    "run-local": "run the whole DAG here with kfp.local on a synthetic dataset (no cluster)",
    "submit": "upload the pipeline to Kubeflow and start a run",
    "prepare": "create/update the credentials Secret and dataset PVC, check GPU nodes",
}


class _ForwardedAction(argparse.ArgumentParser):
    """An action's parser that keeps all its arguments, unread, for `python -m pipelines`
    (argparse.REMAINDER would not take a first argument that looks like an option)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.args = list(args or [])
        return namespace, []


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    # No `common` parent: --params/--set/--debug belong to each action, read by `pipelines`.
    p = subparsers.add_parser(
        "pipeline",
        help="the Kubeflow pipeline: compile, run locally, prepare a namespace, submit",
        description="Build, check and run the person-search pipeline on Kubeflow.",
    )
    actions = p.add_subparsers(
        dest="action", metavar="ACTION", required=True, parser_class=_ForwardedAction
    )
    for name, text in ACTIONS.items():
        actions.add_parser(name, help=text, add_help=False)
    p.set_defaults(func=forward)


def forward(args: argparse.Namespace) -> int:
    """Run `python -m pipelines ACTION ARGS`; its exit status is the command's."""
    env = {**os.environ, "PSEARCH_DEBUG": "1"} if args.debug else None
    command = [sys.executable, "-m", "pipelines", args.action, *args.args]
    with subprocess.Popen(command, env=env) as child:
        while True:
            try:
                status = child.wait()
                break
            except KeyboardInterrupt:
                continue  # Ctrl-C reached the child too: it reports and exits on its own
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell
