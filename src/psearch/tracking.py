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
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
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
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        _log_params(mlflow, flatten(params))
        yield run
