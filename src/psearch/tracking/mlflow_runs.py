"""Where psearch's MLflow runs go and what every one of them carries.

The tracking URI is `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else a
SQLite store `mlflow.db` in the working directory. Every run records the
flattened params, the git revision and the package versions (its provenance);
stage runs add the seed and the data version (the manifests' content hash from
dataset.json).

mlflow is imported inside the functions that talk to the store: it takes
seconds to import, and `psearch --help` imports this package (for dvc_stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from psearch.config import Params, TrackingConfig, flatten
from psearch.errors import PsearchError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Set by a pipeline runner so each stage's run becomes a child of one pipeline run.
PARENT_RUN_ENV = "PSEARCH_PARENT_RUN_ID"
# MLflow limits a param value to 6000 characters and a batch to 100 params.
PARAM_VALUE_LIMIT = 6000
PARAM_BATCH = 100
# MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and an
# experiment without traces opens in GenAI mode. The value is the UI's "model training"
# kind (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT, MLflow 3.17).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"


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


def provenance_tags() -> dict[str, str]:
    """The git revision and package versions, tagged on every run psearch creates."""
    return {
        "psearch.git_revision": git_revision(),
        **{f"psearch.version.{k}": v for k, v in package_versions().items()},
    }


def check_reachable(uri: str) -> None:
    """Fail fast (before hours of training) when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PsearchError(f"MLflow tracking server {uri} is unreachable ({reason})") from None


def connect(params: Params) -> Any:
    """An MlflowClient on the params' store (checked to answer), also set as MLflow's default."""
    import mlflow  # lazy: seconds to import; see the module docstring

    uri = tracking_uri(params.tracking)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def open_experiment(params: Params) -> tuple[Any, str]:
    """connect(), then make the params' experiment (created when missing) the active one,
    tagged as a model-training experiment; returns the client and the experiment id."""
    import mlflow  # lazy: seconds to import; see the module docstring

    client = connect(params)
    experiment = mlflow.set_experiment(params.tracking.experiment)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT_KIND:
        client.set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND
        )
    return client, experiment.experiment_id


def log_params(client: Any, run_id: str, params: Params) -> None:
    """The flattened params on run `run_id`, within MLflow's size limits."""
    from mlflow.entities import Param  # lazy: seconds to import; see the module docstring

    flat = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in flatten(params).items()]
    for start in range(0, len(flat), PARAM_BATCH):
        client.log_batch(run_id, params=flat[start : start + PARAM_BATCH])
