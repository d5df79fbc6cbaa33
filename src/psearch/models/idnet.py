"""IDNet: the joint net's identity branch applied to cropped person boxes (pretraining).

The paper pretrains the trunk and fc layers as a classifier of cropped ground-truth and
background boxes into C + 1 classes, then initialises the joint net from it. IDNet is a
PersonNet like the joint net (the same ``backbone``, ``roi_head``, ``embedding``,
``reid_loss``), and pools the person's box inside each crop as one RoI, so the head sees
exactly the pooled shape it sees in the joint net and the weights transfer by name. Crops
span ``context`` times the box (psearch.imaging explains why); ``context`` is a buffer,
so a saved IDNet remembers it.
"""

from __future__ import annotations

from typing import Any

import torch

from psearch.errors import PsearchError
from psearch.imaging import IMAGE_MEAN, IMAGE_STD, inner_box
from psearch.models.joint import DETECTOR_SETTINGS, JointNet
from psearch.models.person_net import PersonNet

TRANSFERRED_MODULES = ("backbone.", "roi_head.", "embedding.", "reid_loss.")


class IDNet(PersonNet):
    """Crops -> features and identity loss; ``person_net`` takes PersonNet's keyword arguments."""

    def __init__(self, num_classes: int, *, context: float = 1.0, **person_net: Any) -> None:
        super().__init__(num_classes, **person_net)
        self._add_identity_head()
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("crop_context", torch.tensor(float(context)))

    @property
    def context(self) -> float:
        """How many times the person box each crop spans (height and width)."""
        return float(self.crop_context)

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] crops (float 0..1, cut by imaging.cut_crops) -> [B, D] L2-normalised."""
        height, width = crops.shape[-2:]
        feature_map = self.backbone((crops - self.mean) / self.std)
        person = crops.new_tensor([inner_box(height, width, self.context)])
        pooled = self.pool(feature_map, [person] * len(crops), (height, width))
        return self.embed(self.roi_head(pooled))

    def forward(self, crops: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Identity loss and accuracy; labels 0..C-1 identities, C background, -1 ignored."""
        loss, acc = self.reid_loss(self.features(crops), labels)
        return {"loss_reid": loss, "acc_reid": acc.detach()}


def idnet_crop_size(meta: dict[str, Any], default: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the crops an IDNet file was trained on (its meta), else `default`
    (older files did not store it)."""
    return int(meta.get("crop_height", default[0])), int(meta.get("crop_width", default[1]))


def build_idnet(num_classes: int, *, context: float = 1.0, **settings: Any) -> IDNet:
    """An IDNet for ``num_classes`` labelled identities, cutting crops of ``context``.

    ``settings`` are IDNet's keyword arguments; the joint net's detector settings
    (DETECTOR_SETTINGS) may come along and are left out, so the same model params build both
    networks (``**dataclasses.asdict(params.model)``) and older IDNet files, which stored
    them, still load.
    """
    own = {name: value for name, value in settings.items() if name not in DETECTOR_SETTINGS}
    return IDNet(num_classes, context=context, **own)


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
