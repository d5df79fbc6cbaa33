"""Run the whole Kubeflow DAG on this machine with kfp.local (no cluster).

Two runners, both executing the very DAG compiled for the cluster, in DAG order,
with ParallelFor, Collected and If:
  subprocess  `kfp.local.SubprocessRunner(use_venv=False)`: each lightweight component
              in a subprocess of this Python environment (no images needed);
  docker      `kfp.local.DockerRunner`: each component in its image (`make images`),
              on Docker or podman (pipelines.containers), as the images' non-root
              user, with the volumes a cluster would give the pods as bind mounts:
              the dataset read-only at the dataset PVC's mount path, the checkpoint
              PVC, and the MLflow store (mounted at its own path, so the store's
              artifact paths mean the same inside and out).
kfp.local ignores every kfp-kubernetes and resource setting, so the raw dataset
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

import docker
from kfp import local

from components.runtime import params_json
from pipelines.compile import pipeline_function
from pipelines.containers import (
    bind,
    container_user,
    docker_endpoint,
    ensure_image,
    keep_exit_status,
    make_writable,
)
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


RUNNERS = ("subprocess", "docker")


def run_local(
    params: Params, workdir: str | Path, preset: str = "tiny", runner: str = "subprocess"
) -> dict[str, Any]:
    """Synthesise a `preset` dataset in `workdir`, run the DAG on it with `runner`; return
    where things are."""
    if runner not in RUNNERS:
        raise PsearchError(f"--runner {runner}: expected one of {', '.join(RUNNERS)}")
    workdir = Path(workdir).resolve()
    if workdir.exists() and not workdir.is_dir():
        raise PsearchError(f"{workdir}: --workdir exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = workdir / "dataset"
    if not dataset.is_dir():  # reused across runs: the synthetic data is deterministic
        synthesize(dataset, preset=preset, seed=params.data.seed)
    pipeline_root = workdir / "kfp"
    pipeline_root.mkdir(exist_ok=True)
    before = set(pipeline_root.iterdir())
    settings = local_settings(params)
    func = pipeline_function(params, settings)

    if runner == "docker":
        with docker_endpoint(workdir):
            tracking_uri = _run_in_containers(func, params, settings, workdir, dataset)
    else:
        tracking_uri = params.tracking.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
        with _local_environment(workdir, tracking_uri):
            _run_dag(func, dataset_root=str(dataset), params_json=params_json(params))

    run_dir = _latest_run_dir(pipeline_root, before)
    metrics = _find_metrics(run_dir) if run_dir else None
    return {
        "workdir": str(workdir),
        "dataset": str(dataset),
        "run_dir": str(run_dir) if run_dir else None,
        "metrics": str(metrics) if metrics else None,
        "tracking_uri": tracking_uri,
    }


def _run_dag(func: Any, **arguments: str) -> None:
    """Run the pipeline function under the runner kfp.local was initialised with."""
    with warnings.catch_warnings():
        # Images, resources and GPUs are for the cluster; kfp.local says it ignores them
        # for every task. Expected here, so not repeated ten times.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        try:
            func(**arguments)
        except RuntimeError as exc:
            # kfp.local reports a failed task as RuntimeError after streaming its log.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "failed"
            raise PsearchError(f"run-local: {_plain(first)} (task logs above)") from None


def _run_in_containers(
    func: Any, params: Params, settings: PipelineSettings, workdir: Path, dataset: Path
) -> str:
    """Run the DAG with kfp.local.DockerRunner (the endpoint is set up); return the store URI."""
    store = workdir / "mlflow"
    checkpoints = workdir / "checkpoints"
    store.mkdir(exist_ok=True)
    checkpoints.mkdir(exist_ok=True)
    pipeline_root = workdir / "kfp"
    make_writable(pipeline_root, store, checkpoints)
    tracking_uri = params.tracking.tracking_uri or f"sqlite:///{store / 'mlflow.db'}"
    mounts = [bind(dataset, settings.dataset_mount, read_only=True), bind(store, str(store))]
    if settings.checkpoint_root():
        mounts.append(bind(checkpoints, settings.checkpoint_mount))
    runner = local.DockerRunner(
        mounts=mounts,
        user=container_user(),
        # MLflow puts a SQLite store's artifacts under ./mlruns: in the mounted store.
        working_dir=str(store),
        environment={"MLFLOW_TRACKING_URI": tracking_uri, "HOME": "/tmp"},
        # A tracking server on this machine's loopback stays reachable, as in-cluster.
        network_mode="host",
    )
    # Every image before the first task: a missing one is a one-line error, not a task log.
    client = docker.from_env()
    try:
        for kind in ("cpu", "gpu"):
            ensure_image(client, settings.image(kind))
    finally:
        client.close()
    local.init(runner=runner, pipeline_root=str(pipeline_root))
    with keep_exit_status():
        _run_dag(func, dataset_root=settings.dataset_mount, params_json=params_json(params))
    return tracking_uri


def _plain(message: str) -> str:
    """kfp.local colours task names with ANSI escapes; drop them for a one-line error."""
    return re.sub(r"\x1b\[[0-9;]*m", "", message)


def _find_metrics(run_dir: Path) -> Path | None:
    """The evaluate task's metrics.json in a local run's directory."""
    found = sorted(run_dir.glob("evaluate*/report/metrics.json"))
    return found[0] if found else None
