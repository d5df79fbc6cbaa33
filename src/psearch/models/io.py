"""Model files: one portable checkpoint per model, and its MLflow round trip.

A model file is a ``torch.save``d dict of plain types and tensors (loadable with
``torch.load(weights_only=True)``)::

    {"format": "psearch-joint/1" | "psearch-idnet/1", "model_config": {...},
     "loss_config": {...}, "num_classes": C, "state_dict": {...}, "meta": {...}}

``load_model`` rebuilds the right class from the stored configs (without touching
``backbone_weights``: the state dict already holds every weight) from a file, a directory,
or an MLflow URI. ``log_model`` logs a checkpoint to the active MLflow run as a ``pyfunc``
model wrapping the file itself, so both ``load_model("runs:/<id>/model")`` and
``mlflow.pyfunc.load_model(...)`` work.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psearch.atomic import atomic_file
from psearch.config import LossConfig, ModelConfig, _build
from psearch.errors import PsearchError

JOINT_FORMAT = "psearch-joint/1"
IDNET_FORMAT = "psearch-idnet/1"
# File names looked for, in order, when a directory is given.
MODEL_FILE_NAMES = ("model.pt", "idnet.pt")
_REQUIRED_KEYS = ("format", "model_config", "loss_config", "num_classes", "state_dict")


def _format_of(model: nn.Module) -> str:
    from psearch.models.idnet import IDNet
    from psearch.models.joint import JointNet

    if isinstance(model, JointNet):
        return JOINT_FORMAT
    if isinstance(model, IDNet):
        return IDNET_FORMAT
    raise TypeError(f"save_model: expected a JointNet or IDNet, got {type(model).__name__}")


def checkpoint_dict(model: nn.Module, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict save_model writes (also handy inside training checkpoints)."""
    # DDP / torch.compile wrappers keep the real model in .module / ._orig_mod.
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {
        "format": _format_of(model),
        "model_config": dataclasses.asdict(model.cfg),
        "loss_config": dataclasses.asdict(model.loss_cfg),
        "num_classes": int(model.num_classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` and ``meta`` (plain types only) to one file, atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(checkpoint_dict(model, meta), tmp)
    return path


def model_from_checkpoint(checkpoint: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint dict describes and load its weights (eval mode)."""
    from psearch.models.idnet import IDNet
    from psearch.models.joint import JointNet

    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in _REQUIRED_KEYS):
        raise PsearchError(f"{source}: not a psearch model file (missing {_REQUIRED_KEYS})")
    classes = {JOINT_FORMAT: JointNet, IDNET_FORMAT: IDNet}
    fmt = checkpoint["format"]
    if fmt not in classes:
        raise PsearchError(
            f"{source}: unknown model format {fmt!r} (expected one of {list(classes)})"
        )
    try:
        cfg = _build(ModelConfig, checkpoint["model_config"], "model")
        loss_cfg = _build(LossConfig, checkpoint["loss_config"], "train.loss")
    except PsearchError as exc:
        raise PsearchError(f"{source}: stored config is invalid ({exc})") from None
    model = classes[fmt](cfg, loss_cfg, int(checkpoint["num_classes"]), load_weights=False)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PsearchError(f"{source}: weights do not match the stored config ({first})") from None
    return model.eval()


def resolve_model_file(path: Path) -> Path:
    """A model file itself, or the model file inside a directory (also an MLflow model dir)."""
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in [*MODEL_FILE_NAMES, *(f"artifacts/{n}" for n in MODEL_FILE_NAMES)]:
            if (path / candidate).is_file():
                return path / candidate
        found = sorted(path.glob("artifacts/*.pt"))
        if len(found) == 1:
            return found[0]
        raise PsearchError(f"{path}: no {' or '.join(MODEL_FILE_NAMES)} in this directory")
    raise PsearchError(f"{path}: model file not found")


def _is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://"))


def load_model(uri: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, meta) from a file, a directory or an MLflow URI."""
    uri = str(uri)
    if not _is_mlflow_uri(uri):
        return _load_local(resolve_model_file(Path(uri)), device)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    download_dir = Path(tempfile.mkdtemp(prefix="psearch-model-"))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(download_dir)
            )
        except (MlflowException, OSError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PsearchError(f"{uri}: cannot download the model ({message})") from None
        return _load_local(resolve_model_file(Path(local)), device, source=uri)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)


def _load_local(path: Path, device: str | torch.device, source: str | None = None):
    name = source or str(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PsearchError(f"{name}: not a readable psearch model file ({first[:200]})") from None
    model = model_from_checkpoint(checkpoint, source=name)
    return model.to(device), dict(checkpoint.get("meta") or {})


def log_model(model_file: str | Path, name: str = "model") -> tuple[str, str]:
    """Log a model file to the active MLflow run as a pyfunc model.

    Returns ``(runs:/<run id>/<name>, models:/<logged model id>)``: the first is the URI
    users read in the run, the second MLflow 3's own id of the logged model, which the
    registry takes without falling back (and warning) from the run's artifact path.
    """
    import mlflow

    from psearch.models.pyfunc import PersonSearchModel, pip_requirements

    model_file = Path(model_file)
    if not model_file.is_file():
        raise PsearchError(f"{model_file}: model file not found")
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model needs an active MLflow run (mlflow.start_run)")
    logged = mlflow.pyfunc.log_model(
        name=name,
        python_model=PersonSearchModel(),
        artifacts={"checkpoint": str(model_file)},
        pip_requirements=pip_requirements(),
    )
    return f"runs:/{run.info.run_id}/{name}", logged.model_uri
