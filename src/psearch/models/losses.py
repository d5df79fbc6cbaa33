"""Identity losses on L2-normalised re-id features, and `build_reid_loss` choosing one.

Labels follow one convention everywhere: ``0..C-1`` a labelled identity, ``C`` background
(a proposal that matches no person), ``-1`` an unlabelled person (ignored by the softmax
losses, fed to the OIM queue). Every loss returns ``(loss, accuracy)``; accuracy is the
fraction of scored samples whose highest-scoring class is their label (0 when none is scored),
over the classes that loss scores: all C+1 for ``softmax``, each sample's K sampled classes
for ``rss`` (so it reads higher than a full-softmax accuracy would), the table and queue for
``oim``.

- ``rss``: random sampling softmax, the paper (Sec. 3.3): for each sample, the softmax runs over
  K classes only: its own label, the background class, and identities drawn uniformly without
  replacement from the others (K-1 identities when the label is background).
- ``softmax``: the plain C+1 softmax (the paper's ablation baseline).
- ``oim``: online instance matching (the CVPR'17 follow-up): a momentum-updated lookup table of
  the C identities and a circular queue of unlabelled features, no learned classifier.
- ``none``: no identity loss (the paper's separately trained "Deep" detector: the joint net's
  trunk and detection heads trained alone; its fc8 features are never trained).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from psearch.errors import PsearchError

IGNORE = -1
SyncFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Random int64 draws reduced modulo n < 2**31 have a bias below n / 2**62: none measurable.
_DRAW_RANGE = 2**62


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.numel() == 0:
        return logits.new_zeros(())
    return (logits.argmax(dim=1) == targets).float().mean().detach()


def _empty_loss(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Keeps the graph connected (DDP needs every parameter in it) while contributing nothing.
    return features.sum() * 0.0, features.new_zeros(())


def _uniform_below(high: torch.Tensor) -> torch.Tensor:
    """One uniform integer in [0, high[i]) per element of the int64 tensor ``high``."""
    return torch.randint(0, _DRAW_RANGE, high.shape, device=high.device) % high


def distinct_uniform(high: torch.Tensor, count: int) -> torch.Tensor:
    """[N, count] int64: row i is ``count`` distinct integers drawn uniformly from [0, high[i]).

    Rejection: draw every position with replacement, then redraw the positions whose value
    an earlier position of the row already holds, until no row has a repeat. The rule only
    compares values for equality, so it is symmetric under relabelling the integers and each
    row (at any fixed set of positions) is a uniform subset. O(N * count * log count) per
    round; callers keep ``count`` at most half of ``high`` so a round leaves few repeats.
    """
    bounds = high.view(-1, 1).expand(-1, count)
    draws = _uniform_below(bounds)
    while True:
        values, order = draws.sort(dim=1, stable=True)  # stable: the first occurrence stays
        repeat_sorted = torch.zeros_like(draws, dtype=torch.bool)
        repeat_sorted[:, 1:] = values[:, 1:] == values[:, :-1]
        if not bool(repeat_sorted.any()):
            return draws
        repeat = torch.zeros_like(repeat_sorted).scatter_(1, order, repeat_sorted)
        draws[repeat] = _uniform_below(bounds[repeat])


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

    Per step the loss costs O(N * K * D) whatever C is: the K classes of each sample are drawn
    without building anything of size N x (C+1) (``sample_classes``), and only their K rows of
    the classifier are gathered into the logits, so unsampled classes get exactly zero
    gradient. What does grow with C is the classifier itself (its dense weight gradient and
    the optimiser's update, O(C * D), as for any C-way classifier). The accuracy it returns is
    over each sample's K sampled classes, not all C+1 (running the full classifier for a
    logged figure would cost the O(N * C * D) product the sampling avoids).
    """

    def __init__(self, num_classes: int, feat_dim: int, k: int, scale: float = 1.0) -> None:
        super().__init__(num_classes, feat_dim, scale)
        if k < 2:
            raise PsearchError(f"train.loss.rss_k: {k} is too small (needs label + background)")
        self.k = min(k, num_classes + 1)

    def sample_classes(self, targets: torch.Tensor) -> torch.Tensor:
        """[N, K] class indices per sample: its label, the background, then K-2 identities
        drawn uniformly without replacement from the C-1 others (a background sample: the
        background, then K-1 identities of the C).
        """
        n, background, k = targets.numel(), self.num_classes, self.k
        if 2 * (k - 1) > background - 1:
            # K is over half the identities: the top-K of C+1 iid uniform scores is a uniform
            # subset, and O(N * (C+1)) is O(N * K) here. The label (3) and the background (2)
            # score above every other class (< 1), so they come first, in that order.
            scores = torch.rand(n, background + 1, device=targets.device)
            scores[:, background] = 2.0
            scores[torch.arange(n, device=targets.device), targets] = 3.0
            return scores.topk(k, dim=1).indices
        is_background = targets == background
        # K-1 identities for every row, from the C-1 identities other than the label (all C
        # for a background row): draw below that count, then step over the label.
        drawn = distinct_uniform(background - (~is_background).long(), k - 1)
        others = drawn + (drawn >= targets.view(-1, 1)).long()
        # Column 1: the background, or for a background row (whose label is the background)
        # its K-1'th identity; a labelled row leaves that extra draw unused.
        second = torch.where(is_background, others[:, -1], background)
        return torch.cat([targets.view(-1, 1), second.view(-1, 1), others[:, : k - 2]], dim=1)

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
        label_column = torch.zeros_like(targets)  # sample_classes puts the label first
        return F.cross_entropy(logits.float(), label_column), _accuracy(logits, label_column)


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
        labelled = (labels >= 0) & (labels < self.num_classes)
        self._update_table(features[labelled], labels[labelled])
        unlabelled = features[labels == IGNORE]
        size = self.queue.shape[0]
        if size == 0 or unlabelled.numel() == 0:
            return
        unlabelled = unlabelled[-size:]  # more than a queue's worth: the newest win
        slots = (self.queue_next + torch.arange(len(unlabelled), device=self.queue.device)) % size
        self.queue[slots] = unlabelled
        self.queue_next.copy_((self.queue_next + len(unlabelled)) % size)

    def _update_table(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """v <- normalise(m * v + (1 - m) * x) for each (x, label) in batch order.

        Exactly the sequential update, duplicates included: an identity seen r times in the
        batch is updated r times, in batch order, each on the previous result (as the OIM
        paper states the rule, and as the authors' LabeledMatchingLayer applies a batch's
        samples one after another). No closed form exists once every step renormalises, so
        the work runs in rounds: round j updates every identity's j-th occurrence at once
        (identities are distinct within a round: one gather and one indexed write). The
        rounds number the largest multiplicity in the batch (a few tens of foreground RoIs
        of one person at most), not the batch size.
        """
        if labels.numel() == 0:
            return
        sorted_labels, order = labels.sort(stable=True)  # stable: batch order within a label
        position = torch.arange(len(labels), device=labels.device)
        first = torch.ones_like(sorted_labels, dtype=torch.bool)
        first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        group_start = torch.cummax(torch.where(first, position, 0), dim=0).values
        occurrence = position - group_start  # 0 for a label's first sample, 1 for its second...
        rounds = order[occurrence.argsort(stable=True)]
        for rows in rounds.split(torch.bincount(occurrence).tolist()):
            label = labels[rows]
            entry = self.momentum * self.lut[label] + (1.0 - self.momentum) * features[rows]
            self.lut[label] = F.normalize(entry, dim=1)


class NoIdentityLoss(nn.Module):
    """No identity loss: detector-only training (``reid_loss: none``). Contributes zero and
    no gradient, but keeps fc8 in the graph (DDP needs every parameter in it)."""

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _empty_loss(features)


def build_reid_loss(
    *,
    reid_loss: str,
    num_classes: int,
    feat_dim: int,
    rss_k: int = 100,
    softmax_scale: float = 30.0,
    oim_momentum: float = 0.5,
    oim_scalar: float = 30.0,
    oim_queue_size: int = 500,
) -> nn.Module:
    """The identity loss ``reid_loss`` (rss | softmax | oim | none) over ``num_classes`` identities.

    The settings are named as the params' `train.loss` section, so a caller passes that
    section's fields as keyword arguments; ``softmax_scale`` multiplies the unit feature
    before the rss/softmax classifier.
    """
    if num_classes < 1:
        raise PsearchError(f"num_classes: {num_classes}; training needs at least one identity")
    if reid_loss == "rss":
        return RandomSamplingSoftmaxLoss(num_classes, feat_dim, rss_k, softmax_scale)
    if reid_loss == "softmax":
        return SoftmaxLoss(num_classes, feat_dim, softmax_scale)
    if reid_loss == "none":
        return NoIdentityLoss()
    if reid_loss == "oim":
        return OIMLoss(
            num_classes,
            feat_dim,
            queue_size=oim_queue_size,
            momentum=oim_momentum,
            scalar=oim_scalar,
        )
    raise PsearchError(f"train.loss.reid_loss: unknown loss {reid_loss!r}")
