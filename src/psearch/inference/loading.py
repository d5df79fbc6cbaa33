"""Load the models an extraction or a search runs (files or MLflow URIs), checked against the params.

The architecture (trunk, feature size, RoI head) must match `params.model`: features of two
different networks are not comparable, and a silent mismatch would only show as a bad mAP.
The test-time settings (image scale, proposal counts, score threshold, NMS) are taken from the
params, so the extraction does what params.yaml says whatever the model was trained with.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psearch.config import ModelConfig, Params
from psearch.errors import PsearchError
from psearch.models.idnet import IDNet, idnet_crop_size
from psearch.models.io import load_model
from psearch.models.joint import INFERENCE_SETTINGS, JointNet

ARCHITECTURE_FIELDS = (
    "backbone",
    "feat_dim",
    "roi_op",
    "roi_size",
    "head_dim",
    "anchor_sizes",
    "anchor_ratios",
)
# IDNet has no detector: its architecture is the first five.
IDNET_ARCHITECTURE_FIELDS = ARCHITECTURE_FIELDS[:5]
MLFLOW_URI_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable cuda is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PsearchError(f"device {name!r}: expected auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PsearchError(f"device {name!r}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise PsearchError(f"device {name!r}: expected auto, cpu or cuda[:N]")
    return device


def fetch_model(uri: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, meta) from a file, a directory or an MLflow URI."""
    uri = str(uri)
    if not uri.startswith(MLFLOW_URI_PREFIXES):
        return load_model(uri, device)
    # lazy: mlflow takes seconds to import, and local model files do not need it.
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
        return load_model(local, device, source=uri)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)


def inference_settings(cfg: ModelConfig) -> dict[str, Any]:
    """The params' test-time settings, as JointNet.set_inference_settings takes them."""
    return {name: getattr(cfg, name) for name in INFERENCE_SETTINGS}


def check_architecture(source: str, model: nn.Module, wanted: ModelConfig, fields) -> None:
    """Refuse a model whose architecture differs from the params' in any of ``fields``."""
    stored = model.model_settings
    for name in fields:
        have, want = stored[name], getattr(wanted, name)
        if have != want:
            raise PsearchError(
                f"{source}: the model has model.{name}={have!r} but the params say {want!r} "
                "(use the params the model was trained with)"
            )


def load_joint(uri: str, params: Params, device: torch.device) -> tuple[JointNet, dict]:
    """(JointNet in eval mode on `device` with the params' test-time settings, meta)."""
    model, meta = fetch_model(uri, device="cpu")
    if isinstance(model, IDNet):
        raise PsearchError(
            f"{uri}: is an IDNet; --model needs a joint model (IDNet goes to --idnet)"
        )
    check_architecture(uri, model, params.model, ARCHITECTURE_FIELDS)
    model.set_inference_settings(**inference_settings(params.model))
    return model.eval().to(device), meta


def load_idnet(path: str, params: Params, device: torch.device) -> tuple[IDNet, tuple[int, int]]:
    """(IDNet in eval mode on `device`, (crop height, crop width))."""
    model, meta = fetch_model(str(path), device="cpu")
    if not isinstance(model, IDNet):
        raise PsearchError(f"{path}: not an IDNet (pass the idnet.pt of psearch pretrain)")
    check_architecture(str(path), model, params.model, IDNET_ARCHITECTURE_FIELDS)
    crop = idnet_crop_size(meta, (params.pretrain.crop_height, params.pretrain.crop_width))
    return model.eval().to(device), crop
