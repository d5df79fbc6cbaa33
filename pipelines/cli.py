"""`python -m pipelines compile | run-local | submit | prepare` (console script `psearch-kfp`).

The command line of the orchestration wing; `psearch pipeline ARGS` runs
`python -m pipelines ARGS`, so both take the same options: each action takes
psearch's common --params / --set / --debug. User errors print one line,
`error: ...`, and exit 2, as psearch's own commands do.
"""

from __future__ import annotations

import argparse

from pipelines.compile import DEFAULT_PACKAGE, compile_pipeline
from pipelines.local import RUNNERS, run_local
from pipelines.prepare import prepare
from pipelines.submit import split_run_params, submit
from psearch.cli.common import (
    add_command,
    common_parser,
    load_params_from_args,
    print_summary,
    run_handler,
)
from psearch.errors import PsearchError


def build_parser(prog: str = "psearch-kfp") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build, check and run the person-search pipeline on Kubeflow.",
    )
    actions = parser.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    common = common_parser()

    p = add_command(
        actions, common, "compile", _compile, help="compile the DAG to a pipeline YAML (KFP IR)"
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_PACKAGE),
        help=f"where to write it (default: {DEFAULT_PACKAGE})",
    )

    p = add_command(
        actions,
        common,
        "run-local",
        _run_local,
        help="run the whole DAG here with kfp.local on a synthetic dataset (no cluster)",
    )
    p.add_argument(
        "--workdir",
        default="pipeline-local",
        help="dataset, KFP outputs and the MLflow store go here (default: ./pipeline-local)",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "demo", "full"],
        help="synthetic dataset size (default: tiny)",
    )
    p.add_argument(
        "--runner",
        default="subprocess",
        choices=list(RUNNERS),
        help="subprocess: each task in this Python environment (default); docker: each task "
        "in its image (`make images`) on Docker, or podman when there is no Docker",
    )

    p = add_command(
        actions, common, "submit", _submit, help="upload the pipeline to Kubeflow and start a run"
    )
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument(
        "--experiment", default="person-search", help="KFP experiment (created if missing)"
    )
    p.add_argument("--run-name", default=None, help="run name (default: person-search-<time>)")
    p.add_argument(
        "--param",
        dest="run_params",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a pipeline parameter (dataset_root=/mnt/dataset/PRW) or a params.yaml value "
        "(train.lr=0.01); repeatable",
    )
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user)")
    p.add_argument("--version-name", help="pipeline version name (default: time + git rev)")
    p.add_argument("--package", help="submit this compiled YAML instead of compiling the DAG now")

    p = add_command(
        actions,
        common,
        "prepare",
        _prepare,
        help="create/update the credentials Secret and dataset PVC, check GPU nodes",
    )
    p.add_argument("--namespace", required=True, help="namespace the pipeline runs in")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context (default: current)")
    return parser


def _compile(args: argparse.Namespace) -> int:
    summary = compile_pipeline(load_params_from_args(args), args.out)
    print(f"wrote {summary['package']} (images {summary['image_cpu']}, {summary['image_gpu']})")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    result = run_local(
        load_params_from_args(args), args.workdir, preset=args.preset, runner=args.runner
    )
    print_summary(result)
    if result["metrics"]:
        print(f"metrics: {result['metrics']}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    # --param SECTION.KEY=VALUE are params overrides, like --set; the rest are DAG arguments.
    overrides, arguments = split_run_params(args.run_params)
    args.overrides = [*args.overrides, *overrides]
    result = submit(
        load_params_from_args(args),
        host=args.host,
        experiment=args.experiment,
        run_name=args.run_name,
        arguments=arguments,
        namespace=args.namespace,
        version_name=args.version_name,
        package=args.package,
    )
    print(f"run {result['run_id']} started: {result['url']}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    report = prepare(
        load_params_from_args(args),
        args.namespace,
        kubeconfig=args.kubeconfig,
        context=args.context,
    )
    for line in report.lines:
        print(line)
    if report.problems:
        raise PsearchError(
            f"namespace {args.namespace}: {len(report.problems)} problem(s) to fix before "
            "submitting (listed above)"
        )
    return 0


def main(argv: list[str] | None = None, prog: str = "psearch-kfp") -> int:
    return run_handler(build_parser(prog).parse_args(argv))
