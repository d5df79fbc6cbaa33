"""Load the models an extraction or a search runs, checked against the params.

The architecture (trunk, feature size, RoI head) must match `params.model`: features of two
different networks are not comparable, and a silent mismatch would only show as a bad mAP.
The test-time settings (image scale, proposal counts, score threshold, NMS) are taken from the
params, so the extraction does what params.yaml says whatever the model was trained with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from psearch.config import ModelConfig, Params
from psearch.errors import PsearchError

ARCHITECTURE_FIELDS = (
    "backbone",
    "feat_dim",
    "roi_op",
    "roi_size",
    "head_dim",
    "anchor_sizes",
    "anchor_ratios",
)
# IDNet has no detector: its anchors are stored but unused.
IDNET_ARCHITECTURE_FIELDS = ARCHITECTURE_FIELDS[:5]
INFERENCE_FIELDS = (
    "min_size",
    "max_size",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "rpn_nms_thresh",
    "box_score_thresh",
    "box_nms_thresh",
    "detections_per_img",
)


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


def check_architecture(source: str, stored: ModelConfig, wanted: ModelConfig, fields) -> None:
    for name in fields:
        have, want = getattr(stored, name), getattr(wanted, name)
        if have != want:
            raise PsearchError(
                f"{source}: the model has model.{name}={have!r} but the params say {want!r} "
                "(use the params the model was trained with)"
            )


def inference_settings(cfg: ModelConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in INFERENCE_FIELDS}


def load_joint(uri: str, params: Params, device: torch.device):
    """(JointNet in eval mode on `device` with the params' test-time settings, meta)."""
    from psearch.models.idnet import IDNet
    from psearch.models.io import load_model
    from psearch.models.joint import JointNet

    model, meta = load_model(uri, device="cpu")
    if isinstance(model, IDNet):
        raise PsearchError(
            f"{uri}: is an IDNet; --model needs a joint model (IDNet goes to --idnet)"
        )
    check_architecture(uri, model.cfg, params.model, ARCHITECTURE_FIELDS)
    wanted = inference_settings(params.model)
    if inference_settings(model.cfg) != wanted:
        # Rebuild with the params' settings (they are constructor arguments of the parts).
        cfg = dataclasses.replace(model.cfg, **wanted)
        rebuilt = JointNet(cfg, model.loss_cfg, model.num_classes, load_weights=False)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return model.eval().to(device), meta


def load_idnet(path: str, params: Params, device: torch.device):
    """(IDNet in eval mode on `device`, (crop height, crop width))."""
    from psearch.models.idnet import IDNet
    from psearch.models.io import load_model

    model, meta = load_model(str(path), device="cpu")
    if not isinstance(model, IDNet):
        raise PsearchError(f"{path}: not an IDNet (pass the idnet.pt of psearch pretrain)")
    check_architecture(str(path), model.cfg, params.model, IDNET_ARCHITECTURE_FIELDS)
    crop = (
        int(meta.get("crop_height", params.pretrain.crop_height)),
        int(meta.get("crop_width", params.pretrain.crop_width)),
    )
    return model.eval().to(device), crop
