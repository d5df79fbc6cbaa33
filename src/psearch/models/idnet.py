"""IDNet: the joint net's identity branch applied to cropped person boxes (pretraining).

The paper pretrains the trunk and fc layers as a classifier of cropped ground-truth and
background boxes into C + 1 classes, then initialises the joint net from it. IDNet has the
same modules under the same names as JointNet (``backbone``, ``roi_head``, ``embedding``,
``reid_loss``), and pools the person's box inside each crop as one RoI, so the head sees
exactly the pooled shape it sees in the joint net and the weights transfer by name. Crops
span ``context`` times the box (psearch.data.crops explains why); ``context`` is a buffer,
so a saved IDNet remembers it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from psearch.config import LossConfig, ModelConfig
from psearch.data.crops import inner_box
from psearch.errors import PsearchError
from psearch.models.backbones import IMAGE_MEAN, IMAGE_STD, build_backbone
from psearch.models.joint import JointNet, pool_rois
from psearch.models.losses import build_reid_loss

TRANSFERRED_MODULES = ("backbone.", "roi_head.", "embedding.", "reid_loss.")


class IDNet(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        loss_cfg: LossConfig,
        num_classes: int,
        load_weights: bool = True,
        context: float = 1.0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss_cfg = loss_cfg
        self.num_classes = num_classes
        self.feat_dim = cfg.feat_dim
        self.backbone, self.roi_head = build_backbone(cfg, load_weights=load_weights)
        self.embedding = nn.Linear(self.roi_head.out_features, cfg.feat_dim)  # fc8
        self.reid_loss = build_reid_loss(loss_cfg, num_classes, cfg.feat_dim)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("crop_context", torch.tensor(float(context)))

    @property
    def context(self) -> float:
        """How many times the person box each crop spans (height and width)."""
        return float(self.crop_context)

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] crops (float 0..1, cut by data.crops) -> [B, D] L2-normalised features."""
        height, width = crops.shape[-2:]
        feature_map = self.backbone((crops - self.mean) / self.std)
        person = crops.new_tensor([inner_box(height, width, self.context)])
        pooled = pool_rois(feature_map, [person] * len(crops), (height, width), self.cfg)
        return F.normalize(self.embedding(self.roi_head(pooled)).float(), dim=1)

    def forward(self, crops: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Identity loss and accuracy; labels 0..C-1 identities, C background, -1 ignored."""
        loss, acc = self.reid_loss(self.features(crops), labels)
        return {"loss_reid": loss, "acc_reid": acc.detach()}


def build_idnet(
    cfg: ModelConfig, loss_cfg: LossConfig, num_classes: int, context: float = 1.0
) -> IDNet:
    return IDNet(cfg, loss_cfg, num_classes, context=context)


def transfer_idnet_weights(joint: JointNet, idnet_state: dict[str, Any]) -> list[str]:
    """Copy IDNet's trunk, fc6/fc7, fc8 and classifier weights into ``joint``; return the keys.

    ``idnet_state`` is an IDNet state dict or a checkpoint written by ``io.save_model``.
    Identity-loss entries the joint net does not have (another loss kind) are skipped; any
    other missing key or shape difference raises PsearchError.
    """
    if "state_dict" in idnet_state and "format" in idnet_state:
        if idnet_state["format"] != "psearch-idnet/1":
            raise PsearchError(f"not an IDNet checkpoint (format {idnet_state['format']!r})")
        idnet_state = idnet_state["state_dict"]
    target = joint.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for key, value in idnet_state.items():
        if not key.startswith(TRANSFERRED_MODULES):
            continue
        if key not in target:
            if key.startswith("reid_loss."):
                continue
            raise PsearchError(
                f"IDNet weights do not fit the joint model: it has no {key} "
                f"(pretrained with another model.backbone?)"
            )
        if target[key].shape != value.shape:
            raise PsearchError(
                f"IDNet weights do not fit the joint model: {key} is {tuple(value.shape)}, "
                f"the joint model expects {tuple(target[key].shape)} (different model settings?)"
            )
        copied[key] = value
    missing = [k for k in target if k.startswith(TRANSFERRED_MODULES[:3]) and k not in copied]
    if missing:
        raise PsearchError(
            f"IDNet weights do not fit the joint model: {missing[0]} is missing "
            f"({len(missing)} keys in all; pretrained with another model.backbone?)"
        )
    joint.load_state_dict(copied, strict=False)
    return sorted(copied)
