"""Run the whole Kubeflow DAG on this machine with kfp.local (no cluster, no Docker).

`kfp.local.SubprocessRunner(use_venv=False)` executes each lightweight
component in a subprocess of this Python environment, in DAG order, with
ParallelFor, Collected and If as in the cluster. It cannot mount PVCs (and
ignores every other kfp-kubernetes and resource setting), so the raw dataset
is synthesised into the work directory and handed to the DAG through its
`dataset_root` parameter, which in the cluster points into the mounted PVC.
Tracking goes to a SQLite MLflow store in the work directory. kfp.local does honour
retry policies (with their backoff), so the DAG is built here without task retries:
on one machine a failure is a bug to read about at once, not a lost node to wait for
(300 s, then 600 s, before a failed training would be reported).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kfp import local

from components.runtime import params_json
from pipelines.compile import pipeline_function
from pipelines.settings import PipelineSettings, settings_for
from psearch.config import Params
from psearch.errors import PsearchError
from psearch.synth import synthesize


@contextlib.contextmanager
def _local_environment(workdir: Path, tracking_uri: str) -> Iterator[None]:
    """Run from `workdir` (MLflow's default artifact root is relative to it) with its store."""
    old_cwd, old_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def local_settings(params: Params) -> PipelineSettings:
    """The cluster's settings without task retries (see the module's docstring)."""
    settings = copy.copy(settings_for(params))
    settings.train_retries = settings.extract_retries = 0
    return settings


def _latest_run_dir(pipeline_root: Path, before: set[Path]) -> Path | None:
    runs = [p for p in pipeline_root.iterdir() if p.is_dir() and p not in before]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def run_local(params: Params, workdir: str | Path, preset: str = "tiny") -> dict[str, Any]:
    """Synthesise a `preset` dataset in `workdir`, run the DAG on it; return where things are."""
    workdir = Path(workdir).resolve()
    if workdir.exists() and not workdir.is_dir():
        raise PsearchError(f"{workdir}: --workdir exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = workdir / "dataset"
    if not dataset.is_dir():  # reused across runs: the synthetic data is deterministic
        synthesize(dataset, preset=preset, seed=params.data.seed)
    tracking_uri = params.tracking.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    pipeline_root = workdir / "kfp"
    pipeline_root.mkdir(exist_ok=True)
    before = set(pipeline_root.iterdir())

    func = pipeline_function(params, local_settings(params))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    with _local_environment(workdir, tracking_uri), warnings.catch_warnings():
        # Images, resources and GPUs are for the cluster; kfp.local says it ignores them
        # for every task. Expected here, so not repeated ten times.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        try:
            func(dataset_root=str(dataset), params_json=params_json(params))
        except RuntimeError as exc:
            # kfp.local reports a failed task as RuntimeError after streaming its log.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "failed"
            raise PsearchError(f"run-local: {_plain(first)} (task logs above)") from None

    run_dir = _latest_run_dir(pipeline_root, before)
    metrics = _find_metrics(run_dir) if run_dir else None
    return {
        "workdir": str(workdir),
        "dataset": str(dataset),
        "run_dir": str(run_dir) if run_dir else None,
        "metrics": str(metrics) if metrics else None,
        "tracking_uri": tracking_uri,
    }


def _plain(message: str) -> str:
    """kfp.local colours task names with ANSI escapes; drop them for a one-line error."""
    return re.sub(r"\x1b\[[0-9;]*m", "", message)


def _find_metrics(run_dir: Path) -> Path | None:
    """The evaluate task's metrics.json in a local run's directory."""
    found = sorted(run_dir.glob("evaluate*/report/metrics.json"))
    return found[0] if found else None
