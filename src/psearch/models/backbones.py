"""Backbones: a stride-16 trunk (FCN) and the RoI head that maps pooled features to fc7.

Three kinds, all built from torchvision models:

- ``vgg16``: the paper. conv1-conv5_3 (last max-pool dropped, stride 16, 512 channels) as the
  trunk; fc6/fc7 (4096, ReLU, dropout) as the RoI head.
- ``resnet50``: the CVPR'17 follow-up / SeqNet layout. conv1-res4 (stride 16, 1024 channels) as
  the trunk; res5 + global average pooling (2048) as the RoI head.
- ``small``: CPU-friendly. MobileNetV3-Large up to its last stride-16 block (112 channels) as
  the trunk; a narrow two-layer fc head of ``head_dim`` (fc6/fc7-equivalent).

Random init by default. ``backbone_weights`` names either a local file holding the state
dict of the whole torchvision model, or a torchvision weights enum member such as
``IMAGENET1K_V1`` (downloaded by torchvision, only when the user asks for it). By default,
with pretrained weights batch norm is frozen and the first blocks are not trained, as
detection codebases do, and with random init everything trains; ``freeze_blocks`` and
``batch_norm`` state it explicitly (the recipes in configs/ do).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.ops.misc import FrozenBatchNorm2d

from psearch.errors import PsearchError
from psearch.tensorfile import load_tensor_file

# Feature stride of every trunk (the RoI pooling scale is 1 / TRUNK_STRIDE).
TRUNK_STRIDE = 16

_TORCHVISION_ARCH = {"small": "mobilenet_v3_large", "vgg16": "vgg16", "resnet50": "resnet50"}


class Trunk(nn.Module):
    """A sequential fully convolutional trunk that records its output channel count."""

    def __init__(self, body: nn.Sequential, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FcHead(nn.Module):
    """fc6 -> fc7 on flattened pooled features (VGG's classifier, or the narrow small head)."""

    def __init__(self, in_features: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_features = hidden

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.relu(self.fc6(pooled.flatten(1))))
        return self.dropout(torch.relu(self.fc7(x)))


class ResNetHead(nn.Module):
    """res5 followed by global average pooling: [N, 1024, s, s] -> [N, 2048]."""

    def __init__(self, layer4: nn.Module) -> None:
        super().__init__()
        self.layer4 = layer4
        self.out_features = 2048

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(pooled), 1), 1)


def _torchvision_model(
    backbone: str, backbone_weights: str | None, load_weights: bool
) -> nn.Module:
    """The torchvision classification model for ``backbone`` (plain batch norm)."""
    if backbone not in _TORCHVISION_ARCH:
        raise PsearchError(
            f"model.backbone: unknown kind {backbone!r} (expected {', '.join(_TORCHVISION_ARCH)})"
        )
    arch = _TORCHVISION_ARCH[backbone]
    model = models.get_model(arch, weights=None)
    source = backbone_weights if load_weights else None
    if source is None:
        return model
    if Path(source).is_file():
        state = load_tensor_file(source, "backbone weights file")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    else:
        enum = models.get_model_weights(arch)
        if source not in enum.__members__:
            names = ", ".join(enum.__members__)
            raise PsearchError(
                f"model.backbone_weights: {source!r} is neither a file nor a {arch} weights "
                f"name ({names})"
            )
        state = enum[source].get_state_dict(progress=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise PsearchError(f"{source}: not a state dict of torchvision {arch} ({first})") from None
    return model


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that always normalises with its stored statistics but trains its affine
    scale and shift: the authors' OIM ResNet-50 (Caffe ``BN`` layers with ``frozen: true``
    and lr_mult 1). Two images per batch give useless batch statistics; ImageNet's stay."""

    frozen_statistics = True  # the training engine's BatchNorm recalibration skips these

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def _replace_batch_norm(module: nn.Module, kind: str) -> nn.Module:
    """Replace BatchNorm2d layers by ``kind`` (frozen | frozen_stats) with the same values."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if kind == "frozen":
                new: nn.Module = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            else:
                new = FrozenStatsBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                new.weight.copy_(child.weight.detach())
                new.bias.copy_(child.bias.detach())
                new.running_mean.copy_(child.running_mean)
                new.running_var.copy_(child.running_var)
            setattr(module, name, new)
        else:
            _replace_batch_norm(child, kind)
    return module


def _freeze(modules: list[nn.Module]) -> None:
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(False)


# Where each trunk's blocks end, for `freeze_blocks` (a count of leading blocks).
# vgg16 features: conv1 [0, 5), conv2 [5, 10), conv3 [10, 17), conv4 [17, 24), conv5 [24, 30).
_VGG16_BLOCK_ENDS = (5, 10, 17, 24, 30)
# The blocks frozen by default with pretrained weights: conv1-conv2 (py-faster-rcnn's VGG16),
# conv1 + res2 (torchvision's detection ResNets), MobileNetV3's stem and first blocks.
DEFAULT_FROZEN_BLOCKS = {"vgg16": 2, "resnet50": 2, "small": 4}


def _trunk_blocks(backbone: str, body: nn.Sequential) -> list[nn.Module]:
    """The trunk's blocks in order, as `freeze_blocks` counts them."""
    layers = list(body)
    if backbone == "vgg16":
        starts = (0, *_VGG16_BLOCK_ENDS[:-1])
        return [nn.Sequential(*layers[a:b]) for a, b in zip(starts, _VGG16_BLOCK_ENDS, strict=True)]
    return layers  # resnet50: stem, res2, res3, res4; small: MobileNetV3's feature blocks


def build_backbone(
    *,
    backbone: str = "small",
    backbone_weights: str | None = None,
    roi_size: int = 7,
    head_dim: int = 256,
    freeze_blocks: int = -1,
    batch_norm: str = "auto",
    load_weights: bool = True,
) -> tuple[Trunk, nn.Module]:
    """(trunk with ``out_channels``, RoI head with ``out_features``) for ``backbone``.

    ``roi_size`` is the side of the pooled RoIs the head takes; ``head_dim`` the width of
    the small backbone's fc head. ``freeze_blocks`` leading trunk blocks get no gradient (-1:
    DEFAULT_FROZEN_BLOCKS with pretrained weights, none without); ``batch_norm`` is train,
    frozen or frozen_stats (auto: frozen with pretrained weights, train without).
    ``load_weights=False`` builds the same architecture without reading ``backbone_weights``
    (used when a saved model's own state dict is loaded next).
    """
    model = _torchvision_model(backbone, backbone_weights, load_weights)
    pretrained = bool(backbone_weights)  # decides the defaults even when not loading
    if freeze_blocks < 0:
        freeze_blocks = DEFAULT_FROZEN_BLOCKS[backbone] if pretrained else 0
    if batch_norm == "auto":
        batch_norm = "frozen" if pretrained else "train"
    s = roi_size
    if backbone == "vgg16":
        # features[:30] ends at conv5_3 + ReLU: four max-pools, stride 16.
        trunk = Trunk(nn.Sequential(*list(model.features)[:30]), 512)
        head: nn.Module = FcHead(512 * s * s, 4096, dropout=0.5)
        if s == 7:  # the ImageNet fc6 expects 7x7 pooled maps
            head.fc6.load_state_dict(model.classifier[0].state_dict())
            head.fc7.load_state_dict(model.classifier[3].state_dict())
    elif backbone == "resnet50":
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        trunk = Trunk(nn.Sequential(stem, model.layer1, model.layer2, model.layer3), 1024)
        head = ResNetHead(model.layer4)
    else:
        # small: MobileNetV3-Large blocks 0-12 end at stride 16 with 112 channels.
        trunk = Trunk(nn.Sequential(*list(model.features)[:13]), 112)
        head = FcHead(112 * s * s, head_dim, dropout=0.0)
    blocks = _trunk_blocks(backbone, trunk.body)
    if not 0 <= freeze_blocks <= len(blocks):
        raise PsearchError(
            f"model.freeze_blocks: {freeze_blocks} is outside 0..{len(blocks)} for {backbone}"
        )
    if batch_norm != "train":
        _replace_batch_norm(trunk, batch_norm)
        _replace_batch_norm(head, batch_norm)
    _freeze(blocks[:freeze_blocks])
    return trunk, head
