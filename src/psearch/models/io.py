"""Model files: one portable checkpoint per network, written and read back.

A model file is a ``torch.save``d dict of plain types and tensors (loadable with
``torch.load(weights_only=True)``)::

    {"format": "psearch-joint/1" | "psearch-idnet/1", "model_config": {...},
     "loss_config": {...}, "num_classes": C, "state_dict": {...}, "meta": {...}}

``model_config`` holds the network's keyword arguments (named as the ``model`` params) and
``loss_config`` the identity loss's (named as ``train.loss``), so ``load_model`` rebuilds the
right network from the file alone (without touching ``backbone_weights``: the state dict
already holds every weight). It reads a file or a directory holding one (also an MLflow model
directory); MLflow URIs are fetched by ``psearch.inference.loading.fetch_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psearch.atomic import atomic_file
from psearch.errors import PsearchError
from psearch.models.idnet import IDNet, build_idnet
from psearch.models.joint import JointNet, build_joint_net
from psearch.tensorfile import load_tensor_file

JOINT_FORMAT = "psearch-joint/1"
IDNET_FORMAT = "psearch-idnet/1"
# File names looked for, in order, when a directory is given.
MODEL_FILE_NAMES = ("model.pt", "idnet.pt")
_REQUIRED_KEYS = ("format", "model_config", "loss_config", "num_classes", "state_dict")
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    JOINT_FORMAT: build_joint_net,
    IDNET_FORMAT: build_idnet,
}


def _format_of(model: nn.Module) -> str:
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
        "model_config": model.model_settings,
        "loss_config": model.loss_settings,
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
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in _REQUIRED_KEYS):
        raise PsearchError(f"{source}: not a psearch model file (missing {_REQUIRED_KEYS})")
    fmt = checkpoint["format"]
    if fmt not in _BUILDERS:
        raise PsearchError(
            f"{source}: unknown model format {fmt!r} (expected one of {list(_BUILDERS)})"
        )
    settings, loss = checkpoint["model_config"], checkpoint["loss_config"]
    if not isinstance(settings, dict) or not isinstance(loss, dict):
        raise PsearchError(f"{source}: stored config is invalid (not a mapping)")
    try:
        model = _BUILDERS[fmt](
            int(checkpoint["num_classes"]), loss=loss, load_weights=False, **settings
        )
    except (TypeError, ValueError, PsearchError) as exc:
        # Unknown or mistyped keyword arguments of the network or its loss.
        raise PsearchError(f"{source}: stored config is invalid ({exc})") from None
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


def load_model(
    path: str | Path, device: str | torch.device = "cpu", source: str | None = None
) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, meta) from a model file or a directory holding one.

    ``source`` names the model in error messages (default: the file).
    """
    path = resolve_model_file(Path(path))
    name = source or str(path)
    try:
        checkpoint = load_tensor_file(path, "psearch model file")
    except PsearchError as exc:  # name the model as the caller knows it (a registry URI, say)
        raise PsearchError(f"{name}: {str(exc).removeprefix(f'{path}: ')}") from None
    model = model_from_checkpoint(checkpoint, source=name)
    return model.to(device), dict(checkpoint.get("meta") or {})
