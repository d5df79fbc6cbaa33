"""Identity losses: RSS sampling invariants, the softmax baseline, OIM's table and queue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from psearch.config import LossConfig
from psearch.errors import PsearchError
from psearch.models.losses import (
    OIMLoss,
    RandomSamplingSoftmaxLoss,
    SoftmaxLoss,
    build_reid_loss,
)

C, D = 20, 8


def unit_features(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_build_picks_the_configured_loss():
    assert type(build_reid_loss(LossConfig(reid_loss="rss"), C, D)) is RandomSamplingSoftmaxLoss
    assert type(build_reid_loss(LossConfig(reid_loss="softmax"), C, D)) is SoftmaxLoss
    assert type(build_reid_loss(LossConfig(reid_loss="oim"), C, D)) is OIMLoss
    with pytest.raises(PsearchError, match="rss_k"):
        build_reid_loss(LossConfig(rss_k=1), C, D)
    with pytest.raises(PsearchError, match="num_classes"):
        build_reid_loss(LossConfig(), 0, D)


def test_rss_mask_always_holds_label_and_background_and_k_classes():
    loss = RandomSamplingSoftmaxLoss(C, D, k=5)
    targets = torch.tensor([0, 7, 19, C, C, 3] * 50)
    mask = loss.sample_mask(targets)
    assert mask.shape == (len(targets), C + 1)
    assert (mask.sum(dim=1) == 5).all()
    assert mask[torch.arange(len(targets)), targets].all()
    assert mask[:, C].all()


def test_rss_k_is_capped_at_all_classes_and_then_equals_the_full_softmax():
    torch.manual_seed(0)
    rss = RandomSamplingSoftmaxLoss(C, D, k=1000)
    assert rss.k == C + 1
    full = SoftmaxLoss(C, D)
    full.load_state_dict(rss.state_dict())  # same parameter names: weights transfer
    features, labels = unit_features(30), torch.randint(0, C + 1, (30,))
    torch.testing.assert_close(rss(features, labels)[0], full(features, labels)[0])


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_softmax_losses_classify_the_scaled_unit_feature(scale):
    torch.manual_seed(0)
    features, labels = unit_features(30), torch.randint(0, C + 1, (30,))
    full = SoftmaxLoss(C, D, scale=scale)
    expected = F.cross_entropy(full.classifier(scale * features), labels)
    torch.testing.assert_close(full(features, labels)[0], expected)
    # RSS: the same logits, restricted to each sample's K classes (label in column 0).
    rss = RandomSamplingSoftmaxLoss(C, D, k=5, scale=scale)
    rss.load_state_dict(full.state_dict())
    torch.manual_seed(1)
    chosen = rss.sample_classes(labels)
    logits = full.classifier(scale * features).gather(1, chosen)
    torch.manual_seed(1)
    torch.testing.assert_close(rss(features, labels)[0], F.cross_entropy(logits, 0 * labels))


def test_rss_samples_other_identities_uniformly():
    torch.manual_seed(0)
    loss = RandomSamplingSoftmaxLoss(C, D, k=6)
    draws = 20000
    mask = loss.sample_mask(torch.full((draws,), 4))
    others = torch.cat([mask[:, :4], mask[:, 5:C]], dim=1).float().mean(dim=0)
    expected = (6 - 2) / (C - 1)  # K-2 identities drawn from the C-1 others
    assert (others - expected).abs().max() < 4 * math.sqrt(expected / draws) + 0.005
    background_rows = loss.sample_mask(torch.full((draws,), C))[:, :C].float().mean(dim=0)
    assert (background_rows - (6 - 1) / C).abs().max() < 0.02  # K-1 identities of C


def test_rss_gradient_is_zero_outside_the_sampled_classes():
    torch.manual_seed(0)
    loss = RandomSamplingSoftmaxLoss(C, D, k=4)
    captured = {}
    sample = loss.sample_classes

    def capture(targets):
        captured["chosen"] = sample(targets)
        return captured["chosen"]

    loss.sample_classes = capture
    features = unit_features(1).requires_grad_(True)
    value, _ = loss(features, torch.tensor([3]))
    value.backward()
    chosen = captured["chosen"][0]
    assert chosen[0] == 3 and chosen[1] == C  # label first, then background
    sampled = torch.zeros(C + 1, dtype=torch.bool)
    sampled[chosen] = True
    row_has_grad = loss.classifier.weight.grad.abs().sum(dim=1) > 0
    assert torch.equal(row_has_grad, sampled)
    assert not loss.classifier.bias.grad[~sampled].any()
    # and the value is the cross-entropy over exactly those classes
    logits = loss.classifier(features.detach())[0][sampled]
    position = int(sampled[:3].sum())  # the label's index among the sampled classes
    expected = -F.log_softmax(logits, dim=0)[position]
    torch.testing.assert_close(value.detach(), expected.detach())


@pytest.mark.parametrize("kind", ["rss", "softmax"])
def test_softmax_losses_ignore_unlabelled_and_report_accuracy(kind):
    torch.manual_seed(0)
    loss = build_reid_loss(LossConfig(reid_loss=kind, rss_k=5), C, D)
    features = unit_features(6)
    labels = torch.tensor([1, 2, -1, C, -1, 5])
    value, acc = loss(features, labels)
    kept, kept_acc = loss(features[labels >= 0], labels[labels >= 0])
    if kind == "softmax":  # rss resamples, so only the deterministic loss compares exactly
        torch.testing.assert_close(value, kept)
        torch.testing.assert_close(acc, kept_acc)
    assert 0.0 <= float(acc) <= 1.0 and not acc.requires_grad
    features = unit_features(3).requires_grad_(True)
    value, acc = loss(features, torch.full((3,), -1))
    assert float(value.detach()) == 0.0 and float(acc) == 0.0
    value.backward()  # an all-ignored batch still yields a differentiable zero
    assert not features.grad.any()


def test_oim_loss_value_and_background_exclusion():
    loss = OIMLoss(C, D, queue_size=4, momentum=0.5, scalar=10.0)
    loss.lut.copy_(F.normalize(torch.randn(C, D), dim=1))
    loss.eval()  # no update, so the value can be checked against the table
    features = unit_features(3)
    labels = torch.tensor([2, C, 7])  # the background proposal is not scored
    value, acc = loss(features, labels)
    memory = torch.cat([loss.lut, loss.queue])
    logits = 10.0 * features[[0, 2]] @ memory.t()
    torch.testing.assert_close(value, F.cross_entropy(logits, torch.tensor([2, 7])))
    expected_acc = (logits.argmax(1) == torch.tensor([2, 7])).float().mean()
    torch.testing.assert_close(acc, expected_acc)


def test_oim_updates_table_with_momentum_and_fills_the_queue_circularly():
    loss = OIMLoss(C, D, queue_size=3, momentum=0.5, scalar=10.0).train()
    old = F.normalize(torch.randn(C, D), dim=1)
    loss.lut.copy_(old)
    features = unit_features(5)
    labels = torch.tensor([4, -1, C, -1, -1])
    loss(features, labels)
    torch.testing.assert_close(loss.lut[4], F.normalize(0.5 * old[4] + 0.5 * features[0], dim=0))
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[4] = False
    torch.testing.assert_close(loss.lut[untouched], old[untouched])  # background changes nothing
    torch.testing.assert_close(loss.queue, features[[1, 3, 4]])
    assert int(loss.queue_next) == 0
    more = unit_features(2, seed=1)
    loss(more, torch.tensor([-1, -1]))
    torch.testing.assert_close(loss.queue, torch.stack([more[0], more[1], features[4]]))
    assert int(loss.queue_next) == 2
    # eval mode never updates
    frozen_lut, frozen_queue = loss.lut.clone(), loss.queue.clone()
    loss.eval()(unit_features(2, seed=2), torch.tensor([4, -1]))
    assert torch.equal(loss.lut, frozen_lut) and torch.equal(loss.queue, frozen_queue)


def test_oim_sync_hook_sees_the_detached_batch_before_the_update():
    seen = {}
    other_replica = unit_features(1, seed=3)

    def all_gather(features, labels):
        seen["requires_grad"] = features.requires_grad
        return torch.cat([features, other_replica]), torch.cat([labels, torch.tensor([9])])

    loss = OIMLoss(C, D, queue_size=2, momentum=0.0, scalar=1.0, sync=all_gather).train()
    features = unit_features(1).requires_grad_(True)
    loss(features, torch.tensor([2]))
    assert seen["requires_grad"] is False
    # momentum 0: entries become the (gathered) features themselves
    torch.testing.assert_close(loss.lut[2], features.detach()[0])
    torch.testing.assert_close(loss.lut[9], other_replica[0])


def test_oim_gradient_reaches_features_not_the_table():
    loss = OIMLoss(C, D, queue_size=2, momentum=0.5, scalar=30.0)
    loss.lut.copy_(F.normalize(torch.randn(C, D), dim=1))
    features = unit_features(2).requires_grad_(True)
    value, _ = loss(features, torch.tensor([1, 3]))
    value.backward()
    assert features.grad.any()
    assert list(loss.parameters()) == []
    assert set(loss.state_dict()) == {"lut", "queue", "queue_next"}
