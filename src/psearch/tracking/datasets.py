"""The manifests as an MLflow dataset input, so the UI's Dataset column and filter work.

A stage that reads manifests logs them with `mlflow.log_input`: the dataset's name is
dataset.json's `name`, its digest the manifests' content hash (shortened to what MLflow
stores) and its source the raw dataset's directory (where the images are); the
context says which split the stage read (train or test).
Runs on the same data then share one dataset in the UI.

mlflow is imported inside the functions: it takes seconds, and `psearch --help`
imports this package.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

# MLflow's dataset table keeps 36 characters of digest.
DIGEST_LENGTH = 12


def read_dataset_info(manifests: str | Path | None) -> dict[str, Any]:
    """dataset.json of `manifests` ({} when missing or unreadable)."""
    if manifests is None:
        return {}
    try:
        info = json.loads((Path(manifests) / "dataset.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def short_digest(version: str, length: int = DIGEST_LENGTH) -> str:
    """'sha256:3f2a9c…' -> '3f2a9c…' cut to `length` ('' for an unknown version)."""
    if not version or version == "unknown":
        return ""
    return version.split(":", 1)[-1][:length]


def dataset_source(manifests: Path, info: dict[str, Any]) -> str:
    """Where the data is: $PSEARCH_DATASET_ROOT, else dataset.json's root (made absolute),
    else the manifests directory."""
    override = os.environ.get("PSEARCH_DATASET_ROOT")
    if override:
        return override
    root = info.get("root")
    if not root:
        return str(Path(manifests).resolve())
    if "://" in str(root):
        return str(root)
    return str((Path(manifests) / root).resolve())


def manifests_dataset(manifests: str | Path, version: str) -> Any | None:
    """An mlflow MetaDataset for `manifests` (None when dataset.json is missing)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source  # lazy: see above
    from mlflow.data.meta_dataset import MetaDataset  # lazy: see above

    info = read_dataset_info(manifests)
    digest = short_digest(version)
    if not info or not digest:
        return None

    with warnings.catch_warnings():
        # MLflow registers its local source twice (schemes "" and "file") and warns that a
        # path could be either; both are the same LocalArtifactDatasetSource.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(dataset_source(Path(manifests), info))
    name = str(info.get("name") or Path(manifests).name)
    return MetaDataset(source, name=name, digest=digest)


def log_manifests_input(manifests: str | Path | None, version: str, context: str) -> bool:
    """Log `manifests` as an input of the active run with `context`; False when there is no
    dataset.json to describe it."""
    if manifests is None:
        return False
    import mlflow  # lazy: see above

    dataset = manifests_dataset(manifests, version)
    if dataset is None:
        return False
    mlflow.log_input(dataset, context=context)
    return True
