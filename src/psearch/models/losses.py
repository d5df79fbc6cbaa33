"""Identity losses on L2-normalised re-id features.

Labels follow one convention everywhere: ``0..C-1`` a labelled identity, ``C`` background
(a proposal that matches no person), ``-1`` an unlabelled person (ignored by the softmax
losses, fed to the OIM queue). Every loss returns ``(loss, accuracy)``; accuracy is the
fraction of scored samples whose highest-scoring class is their label (0 when none is scored).

- ``rss``: random sampling softmax, the paper (Sec. 3.3): for each sample, the softmax runs over
  K classes only: its own label, the background class, and identities drawn uniformly without
  replacement from the others (K-1 identities when the label is background).
- ``softmax``: the plain C+1 softmax (the paper's ablation baseline).
- ``oim``: online instance matching (the CVPR'17 follow-up): a momentum-updated lookup table of
  the C identities and a circular queue of unlabelled features, no learned classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from psearch.config import LossConfig
from psearch.errors import PsearchError

IGNORE = -1
SyncFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.numel() == 0:
        return logits.new_zeros(())
    return (logits.argmax(dim=1) == targets).float().mean().detach()


def _empty_loss(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Keeps the graph connected (DDP needs every parameter in it) while contributing nothing.
    return features.sum() * 0.0, features.new_zeros(())


class SoftmaxLoss(nn.Module):
    """fc8 -> linear classifier over C identities + background, plain cross-entropy."""

    def __init__(self, num_classes: int, feat_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = scale
        # Named `classifier` in every loss and in IDNet so pretrained weights transfer.
        self.classifier = nn.Linear(feat_dim, num_classes + 1)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = labels != IGNORE
        if not keep.any():
            return _empty_loss(features)
        logits = self.classifier(self.scale * features[keep])
        targets = labels[keep]
        return F.cross_entropy(logits.float(), targets), _accuracy(logits, targets)


class RandomSamplingSoftmaxLoss(SoftmaxLoss):
    """The paper's random sampling softmax: each sample's softmax over K sampled classes.

    Only the K sampled rows of the classifier enter each sample's logits (a gather and a
    batched dot product instead of the full [N, C+1] product), so unsampled classes get
    exactly zero gradient and the cost no longer grows with C.
    """

    def __init__(self, num_classes: int, feat_dim: int, k: int, scale: float = 1.0) -> None:
        super().__init__(num_classes, feat_dim, scale)
        if k < 2:
            raise PsearchError(f"train.loss.rss_k: {k} is too small (needs label + background)")
        self.k = min(k, num_classes + 1)

    def sample_classes(self, targets: torch.Tensor) -> torch.Tensor:
        """[N, K] class indices per sample: its label first, then background, then the rest."""
        background = self.num_classes
        # The top-K of iid uniform scores is a uniform subset; the label (3) and the background
        # (2) score above every other class (< 1), so they are always in it, in that order.
        scores = torch.rand(targets.numel(), background + 1, device=targets.device)
        scores[:, background] = 2.0
        scores[torch.arange(targets.numel(), device=targets.device), targets] = 3.0
        return scores.topk(self.k, dim=1).indices

    def sample_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """[N, C+1] bool: True for the classes in each sample's softmax."""
        chosen = self.sample_classes(targets)
        mask = torch.zeros(len(targets), self.num_classes + 1, dtype=torch.bool)
        return mask.to(targets.device).scatter_(1, chosen, True)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k >= self.num_classes + 1:
            return super().forward(features, labels)  # K covers every class: plain softmax
        keep = labels != IGNORE
        if not keep.any():
            return _empty_loss(features)
        x, targets = self.scale * features[keep], labels[keep]
        chosen = self.sample_classes(targets)
        weight, bias = self.classifier.weight[chosen], self.classifier.bias[chosen]
        logits = torch.einsum("nkd,nd->nk", weight, x.to(weight.dtype)) + bias
        loss = F.cross_entropy(logits.float(), torch.zeros_like(targets))  # label is column 0
        with torch.no_grad():  # accuracy over all classes, the meaningful figure to log
            accuracy = _accuracy(self.classifier(x), targets)
        return loss, accuracy


class OIMLoss(nn.Module):
    """Online instance matching over a lookup table (C x D) and a queue of unlabelled features.

    The table and queue are buffers (saved with the model, never touched by the optimiser).
    ``sync`` is an optional function ``(features, labels) -> (features, labels)`` applied to
    the detached batch before the table/queue update; a DDP trainer sets it to an all-gather
    so that every replica updates its table with the whole global batch and tables stay equal.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        queue_size: int,
        momentum: float,
        scalar: float,
        sync: SyncFn | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.momentum = momentum
        self.scalar = scalar
        self.sync = sync
        self.register_buffer("lut", torch.zeros(num_classes, feat_dim))
        self.register_buffer("queue", torch.zeros(queue_size, feat_dim))
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labelled = (labels >= 0) & (labels < self.num_classes)
        if labelled.any():
            memory = torch.cat([self.lut, self.queue]).to(features.dtype)
            logits = self.scalar * features[labelled] @ memory.t()
            targets = labels[labelled]
            loss, acc = F.cross_entropy(logits, targets), _accuracy(logits, targets)
        else:
            loss, acc = _empty_loss(features)
        if self.training:
            self.update(features.detach(), labels)
        return loss, acc

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.sync is not None:
            features, labels = self.sync(features, labels)
        features = features.to(self.lut.dtype)
        for feature, label in zip(features, labels.tolist(), strict=True):
            if 0 <= label < self.num_classes:
                entry = self.momentum * self.lut[label] + (1.0 - self.momentum) * feature
                self.lut[label] = F.normalize(entry, dim=0)
        unlabelled = features[labels == IGNORE]
        size = self.queue.shape[0]
        if size == 0 or unlabelled.numel() == 0:
            return
        unlabelled = unlabelled[-size:]  # more than a queue's worth: the newest win
        slots = (self.queue_next + torch.arange(len(unlabelled), device=self.queue.device)) % size
        self.queue[slots] = unlabelled
        self.queue_next.copy_((self.queue_next + len(unlabelled)) % size)


def build_reid_loss(loss_cfg: LossConfig, num_classes: int, feat_dim: int) -> nn.Module:
    """The identity loss named by ``loss_cfg.reid_loss`` over ``num_classes`` identities."""
    if num_classes < 1:
        raise PsearchError(f"num_classes: {num_classes}; training needs at least one identity")
    if loss_cfg.reid_loss == "rss":
        return RandomSamplingSoftmaxLoss(
            num_classes, feat_dim, loss_cfg.rss_k, loss_cfg.softmax_scale
        )
    if loss_cfg.reid_loss == "softmax":
        return SoftmaxLoss(num_classes, feat_dim, loss_cfg.softmax_scale)
    if loss_cfg.reid_loss == "oim":
        return OIMLoss(
            num_classes,
            feat_dim,
            queue_size=loss_cfg.oim_queue_size,
            momentum=loss_cfg.oim_momentum,
            scalar=loss_cfg.oim_scalar,
        )
    raise PsearchError(f"train.loss.reid_loss: unknown loss {loss_cfg.reid_loss!r}")
