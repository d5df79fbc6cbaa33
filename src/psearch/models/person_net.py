"""What the joint net and IDNet share: trunk, RoI head (fc6/fc7), fc8 embedding, identity loss.

``PersonNet`` takes the keyword arguments both networks have (named as the ``model`` params:
``backbone``, ``backbone_weights``, ``feat_dim``, ``roi_op``, ``roi_size``, ``head_dim``,
``freeze_blocks``, ``batch_norm``) and
``loss``, the keyword arguments of ``losses.build_reid_loss`` (named as ``train.loss``; None:
the paper's random sampling softmax with that function's defaults). The parts are named
alike in both networks (``backbone``, ``roi_head``, ``embedding``, ``reid_loss``) so IDNet's
weights transfer into the joint net by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, roi_pool

from psearch.errors import PsearchError
from psearch.models.backbones import build_backbone
from psearch.models.losses import build_reid_loss

ROI_OPS = ("roi_pool", "roi_align")
# The identity loss when none is named: the paper's random sampling softmax.
DEFAULT_LOSS = {"reid_loss": "rss"}


def pool_rois(
    feature_map: torch.Tensor,
    boxes: list[torch.Tensor],
    image_size: tuple[int, int],
    roi_op: str,
    roi_size: int,
) -> torch.Tensor:
    """RoI-pool ``boxes`` (pixels of the batched image of ``image_size``) to [N, C, s, s]."""
    # The trunk's stride, as torchvision's MultiScaleRoIAlign infers it (a power of two).
    scale = 2.0 ** round(math.log2(feature_map.shape[-1] / image_size[-1]))
    # Pool in float32: the CPU kernels have no bf16/fp16 version (torchvision's CUDA autocast
    # wrappers do the same cast); the fc layers after it run in the autocast dtype again.
    feature_map = feature_map.float()
    boxes = [b.float() for b in boxes]
    if roi_op == "roi_align":
        return roi_align(feature_map, boxes, roi_size, scale, sampling_ratio=2)
    return roi_pool(feature_map, boxes, roi_size, scale)


class PersonNet(nn.Module):
    """A stride-16 trunk and RoI head, then fc8 and an identity loss over ``num_classes``.

    Subclasses build their own parts, then call ``_add_identity_head()``: the order in which
    modules are created decides which random numbers initialise them, and each network keeps
    the order its weights were always drawn in.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "small",
        backbone_weights: str | None = None,
        feat_dim: int = 256,
        roi_op: str = "roi_align",
        roi_size: int = 7,
        head_dim: int = 256,
        freeze_blocks: int = -1,
        batch_norm: str = "auto",
        loss: Mapping[str, Any] | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        if roi_op not in ROI_OPS:
            raise PsearchError(f"model.roi_op: unknown {roi_op!r} (expected {', '.join(ROI_OPS)})")
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.roi_op = roi_op
        self.roi_size = roi_size
        self._settings = {
            "backbone": backbone,
            "backbone_weights": backbone_weights,
            "feat_dim": feat_dim,
            "roi_op": roi_op,
            "roi_size": roi_size,
            "head_dim": head_dim,
            "freeze_blocks": freeze_blocks,
            "batch_norm": batch_norm,
        }
        self._loss_settings = dict(loss if loss is not None else DEFAULT_LOSS)
        self.backbone, self.roi_head = build_backbone(
            backbone=backbone,
            backbone_weights=backbone_weights,
            roi_size=roi_size,
            head_dim=head_dim,
            freeze_blocks=freeze_blocks,
            batch_norm=batch_norm,
            load_weights=load_weights,
        )

    def _add_identity_head(self) -> None:
        self.embedding = nn.Linear(self.roi_head.out_features, self.feat_dim)  # fc8
        self.reid_loss = build_reid_loss(
            num_classes=self.num_classes, feat_dim=self.feat_dim, **self._loss_settings
        )

    @property
    def model_settings(self) -> dict[str, Any]:
        """The network's keyword arguments (the ``model`` params' names) as plain values."""
        return dict(self._settings)

    @property
    def loss_settings(self) -> dict[str, Any]:
        """The identity loss's keyword arguments (the ``train.loss`` params' names)."""
        return dict(self._loss_settings)

    def pool(
        self, feature_map: torch.Tensor, boxes: list[torch.Tensor], image_size: tuple[int, int]
    ) -> torch.Tensor:
        """[N, C, s, s] pooled ``boxes`` (pixels of the batched image of ``image_size``)."""
        return pool_rois(feature_map, boxes, image_size, self.roi_op, self.roi_size)

    def embed(self, fc7: torch.Tensor) -> torch.Tensor:
        """fc8 + L2 normalisation (computed in float32 so bf16 autocast keeps unit norms)."""
        return F.normalize(self.embedding(fc7).float(), dim=1)
