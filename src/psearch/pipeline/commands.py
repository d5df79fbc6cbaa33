"""`psearch pipeline compile | run-local | submit | prepare`: the Kubeflow pipeline.

Light on purpose: kfp and kubernetes are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "pipeline",
        help="the Kubeflow pipeline: compile, run locally, prepare a namespace, submit",
        description="Build, check and run the person-search pipeline on Kubeflow.",
    )
    actions = parser.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "compile", parents=[common], help="compile the DAG to a pipeline YAML (KFP IR)"
    )
    p.add_argument(
        "--out",
        default="pipelines/person_search.yaml",
        help="where to write it (default: pipelines/person_search.yaml)",
    )
    p.set_defaults(func=_compile)

    p = actions.add_parser(
        "run-local",
        parents=[common],
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
    p.set_defaults(func=_run_local)

    p = actions.add_parser(
        "submit", parents=[common], help="upload the pipeline to Kubeflow and start a run"
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
    p.add_argument(
        "--version-name", default=None, help="pipeline version name (default: time + git rev)"
    )
    p.add_argument(
        "--package",
        default=None,
        help="submit this compiled YAML instead of compiling the DAG now",
    )
    p.set_defaults(func=_submit)

    p = actions.add_parser(
        "prepare",
        parents=[common],
        help="create/update the credentials Secret and dataset PVC, check GPU nodes",
    )
    p.add_argument("--namespace", required=True, help="namespace the pipeline runs in")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context (default: current)")
    p.set_defaults(func=_prepare)


def _params(args):
    from psearch.cli import load_params_from_args

    return load_params_from_args(args)


def _compile(args) -> int:
    from psearch.pipeline.compile import compile_pipeline

    summary = compile_pipeline(_params(args), args.out)
    print(f"wrote {summary['package']} (images {summary['image_cpu']}, {summary['image_gpu']})")
    return 0


def _run_local(args) -> int:
    from psearch.pipeline.local import run_local

    result = run_local(_params(args), args.workdir, preset=args.preset)
    print(json.dumps(result, indent=2))
    if result["metrics"]:
        print(f"metrics: {result['metrics']}")
    return 0


def _submit(args) -> int:
    from psearch.pipeline.submit import split_run_params, submit

    overrides, arguments = split_run_params(args.run_params)
    args.overrides = [*args.overrides, *overrides]
    result = submit(
        _params(args),
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


def _prepare(args) -> int:
    from psearch.pipeline.prepare import prepare

    report = prepare(
        _params(args), args.namespace, kubeconfig=args.kubeconfig, context=args.context
    )
    for line in report.lines:
        print(line)
    if report.problems:
        from psearch.errors import PsearchError

        raise PsearchError(
            f"namespace {args.namespace}: {len(report.problems)} problem(s) to fix before "
            "submitting (listed above)"
        )
    return 0
