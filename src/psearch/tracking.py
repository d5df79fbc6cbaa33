"""MLflow tracking: one run per stage execution, tagged so any run can be reproduced.

Every run records the flattened params, the seed, the data version (the
manifests' content hash from dataset.json), the git revision and the package
versions. The tracking URI is `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI,
else a SQLite store `mlflow.db` in the working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from psearch.config import Params, TrackingConfig, flatten
from psearch.errors import PsearchError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Set by a pipeline runner so each stage's run becomes a child of one pipeline run.
PARENT_RUN_ENV = "PSEARCH_PARENT_RUN_ID"


def tracking_uri(cfg: TrackingConfig | None = None) -> str:
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_revision(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PSEARCH_GIT_REV", "unknown")


def data_version(manifests: str | Path | None) -> str:
    """The manifests' content hash (dataset.json), or 'unknown'."""
    if manifests is None:
        return "unknown"
    path = Path(manifests) / "dataset.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unknown"
    return str(info.get("content_hash") or info.get("annotation_hash") or "unknown")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "mlflow", "psearch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def check_reachable(uri: str) -> None:
    """Fail fast (before hours of training) when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PsearchError(f"MLflow tracking server {uri} is unreachable ({reason})") from None


def _log_params(mlflow, params: dict[str, Any]) -> None:
    # MLflow limits a value to 6000 characters and a batch to 100 params.
    items = [(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    manifests: str | Path | None = None,
    seed: int | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage, with params and reproducibility tags; yields the run.

    Yields None when tracking is disabled (`tracking.enabled: false`).
    """
    if not params.tracking.enabled:
        yield None
        return
    import mlflow

    uri = tracking_uri(params.tracking)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(params.tracking.experiment)
    tags = {
        "psearch.stage": stage,
        "psearch.data_version": data_version(manifests),
        "psearch.git_revision": git_revision(),
        "psearch.seed": str(seed if seed is not None else ""),
        **{f"psearch.version.{k}": v for k, v in package_versions().items()},
        **(extra_tags or {}),
    }
    parent = os.environ.get(PARENT_RUN_ENV) or pipeline_parent_run(params, uri, tags)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        _log_params(mlflow, flatten(params))
        if parent and tags["psearch.data_version"] != "unknown":
            # The pipeline run learns the data version from the first stage that reads data.
            mlflow.MlflowClient().set_tag(
                parent, "psearch.data_version", tags["psearch.data_version"]
            )
        yield run
    _note_stage_run(stage, run.info.run_id)


# ---------------------------------------------------------------------------
# One parent run per pipeline execution under plain `dvc repro`.
#
# DVC runs each stage's command in a fresh process and has no hook around a
# whole `dvc repro`, so the stages of one execution find each other through a
# small record file in DVC's scratch directory (.dvc/tmp, never committed):
# - the CLI notes every stage's start and end there (`dvc_stage`; no MLflow
#   import, so it costs nothing for stages that do not track);
# - the first stage that opens an MLflow run creates the execution's parent run
#   and stores its id there (`pipeline_parent_run`);
# - the `register` stage, the last one, closes the execution (`finish_pipeline`):
#   stages without an MLflow run of their own (synth, ingest, extract, evaluate)
#   get a child run carrying their recorded times, the parent run ends, and the
#   record is kept as psearch-pipeline-last.json (the demo prints its timings).
# A stage that already finished in the open record starts a new execution; a
# killed stage never finished, so `dvc repro` after a kill continues the same
# execution and the same parent run.

PIPELINE_RECORD = "psearch-pipeline.json"
LAST_PIPELINE_RECORD = "psearch-pipeline-last.json"


def _record_path(name: str = PIPELINE_RECORD) -> Path | None:
    """The execution record when this process is a stage run by DVC, else None."""
    root = os.environ.get("DVC_ROOT")
    if not root or not os.environ.get("DVC_STAGE"):
        return None
    return Path(root) / ".dvc" / "tmp" / name


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "execution" in record else None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    from psearch.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _new_record(previous: dict[str, Any] | None) -> dict[str, Any]:
    stale = list((previous or {}).get("stale_parents", []))
    if previous and previous.get("parent_run_id"):
        stale.append([previous["parent_run_id"], previous.get("tracking_uri")])
    return {
        "execution": uuid.uuid4().hex,
        "started_ms": _now_ms(),
        "parent_run_id": None,
        "tracking_uri": None,
        "stale_parents": stale,
        "stages": {},
    }


@contextlib.contextmanager
def dvc_stage(command: str) -> Iterator[None]:
    """Note a stage's start and end in the execution record when DVC runs it (else nothing)."""
    path = _record_path()
    if path is None:
        yield
        return
    stage = os.environ["DVC_STAGE"]
    record = read_record(path)
    if record is None or record["stages"].get(stage, {}).get("end_ms") is not None:
        record = _new_record(record)  # no open execution, or this stage already ran in it
    record["stages"][stage] = {"command": command, "start_ms": _now_ms(), "end_ms": None}
    _write_record(path, record)
    execution = record["execution"]
    yield
    record = read_record(path)
    if record is None or record["execution"] != execution:
        return  # the register stage closed the execution itself
    record["stages"][stage]["end_ms"] = _now_ms()
    _write_record(path, record)


def _create_parent(client, experiment_id: str, record: dict[str, Any], params: Params) -> str:
    from mlflow.entities import Param

    tags = {
        "psearch.stage": "pipeline",
        "psearch.runner": "dvc",
        "psearch.git_revision": git_revision(),
        "psearch.data_version": "unknown",
        **{f"psearch.version.{k}": v for k, v in package_versions().items()},
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["psearch.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    run = client.create_run(
        experiment_id, start_time=record["started_ms"], tags=tags, run_name="pipeline"
    )
    flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for start in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[start : start + 100])
    return run.info.run_id


def _close_stale_parents(client, record: dict[str, Any], uri: str) -> None:
    """End the parent runs of executions that never reached `register`."""
    keep = []
    for run_id, run_uri in record.get("stale_parents", []):
        if run_uri != uri:
            keep.append([run_id, run_uri])
            continue
        with contextlib.suppress(Exception):  # already deleted or ended: nothing to do
            client.set_terminated(run_id, "FINISHED")
    record["stale_parents"] = keep


def _ensure_parent(record: dict[str, Any], params: Params, uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    if record.get("parent_run_id") and record.get("tracking_uri") == uri:
        return record["parent_run_id"]
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(params.tracking.experiment)
    record["parent_run_id"] = _create_parent(client, experiment.experiment_id, record, params)
    record["tracking_uri"] = uri
    _close_stale_parents(client, record, uri)
    return record["parent_run_id"]


def pipeline_parent_run(params: Params, uri: str, tags: dict[str, str] | None = None) -> str | None:
    """The parent run id of the current `dvc repro` execution (created on first use), or None."""
    path = _record_path()
    record = read_record(path) if path else None
    if record is None:
        return None
    parent = _ensure_parent(record, params, uri)
    _write_record(path, record)
    return parent


def _note_stage_run(stage: str, run_id: str) -> None:
    path = _record_path()
    record = read_record(path) if path else None
    name = os.environ.get("DVC_STAGE", stage)
    if record is None or name not in record["stages"]:
        return
    record["stages"][name]["run_id"] = run_id
    _write_record(path, record)


def finish_pipeline(params: Params) -> str | None:
    """Close the current `dvc repro` execution (see above); returns the parent run id or None."""
    path = _record_path()
    record = read_record(path) if path else None
    if record is None:
        return None
    stage = os.environ["DVC_STAGE"]
    record["stages"].setdefault(stage, {"start_ms": record["started_ms"]})["end_ms"] = _now_ms()
    parent = None
    if params.tracking.enabled:
        import mlflow
        from mlflow.entities import Param

        uri = tracking_uri(params.tracking)
        parent = _ensure_parent(record, params, uri)
        client = mlflow.MlflowClient(uri)
        parent_run = client.get_run(parent)
        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for name, info in record["stages"].items():
            if info.get("run_id") or info.get("end_ms") is None:
                continue
            tags = {
                "psearch.stage": name,
                "mlflow.parentRunId": parent,
                "psearch.data_version": parent_run.data.tags.get("psearch.data_version", "unknown"),
                "psearch.git_revision": parent_run.data.tags.get("psearch.git_revision", "unknown"),
            }
            child = client.create_run(
                parent_run.info.experiment_id, start_time=info["start_ms"], tags=tags, run_name=name
            )
            for start in range(0, len(flat), 100):
                client.log_batch(child.info.run_id, params=flat[start : start + 100])
            client.set_terminated(child.info.run_id, "FINISHED", end_time=info["end_ms"])
            info["run_id"] = child.info.run_id
        client.set_terminated(parent, "FINISHED", end_time=_now_ms())
    _write_record(path.with_name(LAST_PIPELINE_RECORD), record)
    path.unlink(missing_ok=True)
    return parent


def stage_seconds(record: dict[str, Any]) -> dict[str, float]:
    """{stage: wall seconds} of an execution record, in the order the stages ran."""
    return {
        name: (info["end_ms"] - info["start_ms"]) / 1000.0
        for name, info in record.get("stages", {}).items()
        if info.get("end_ms") is not None
    }
