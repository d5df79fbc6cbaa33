"""Identity losses: RSS sampling (uniformity, O(N*K) memory), the softmax baseline, OIM's
table (vectorised update == the sequential rule) and queue."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2
from torch.profiler import ProfilerActivity, profile

from psearch.config import LossConfig
from psearch.errors import PsearchError
from psearch.models import losses
from psearch.models.losses import (
    OIMLoss,
    RandomSamplingSoftmaxLoss,
    SoftmaxLoss,
    build_reid_loss,
)

C, D = 20, 8


def unit_features(n: int, seed: int = 0, dim: int = D) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def build(cfg: LossConfig, num_classes: int = C, feat_dim: int = D):
    return build_reid_loss(**dataclasses.asdict(cfg), num_classes=num_classes, feat_dim=feat_dim)


def test_build_takes_the_loss_sections_fields_as_keywords():
    assert type(build(LossConfig(reid_loss="rss"))) is RandomSamplingSoftmaxLoss
    assert type(build(LossConfig(reid_loss="softmax"))) is SoftmaxLoss
    oim = build(LossConfig(reid_loss="oim", oim_queue_size=7, oim_momentum=0.2, oim_scalar=3.0))
    assert type(oim) is OIMLoss
    assert (oim.queue.shape[0], oim.momentum, oim.scalar) == (7, 0.2, 3.0)
    rss = build(LossConfig(rss_k=6, softmax_scale=2.0))
    assert (rss.k, rss.scale) == (6, 2.0)
    with pytest.raises(PsearchError, match="rss_k"):
        build(LossConfig(rss_k=1))
    with pytest.raises(PsearchError, match="num_classes"):
        build(LossConfig(), num_classes=0)
    with pytest.raises(PsearchError, match="reid_loss"):
        build_reid_loss(reid_loss="arcface", num_classes=C, feat_dim=D)


def sampled_mask(chosen: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C+1] bool of an [N, K] choice (tests only: small C)."""
    return torch.zeros(len(chosen), num_classes + 1, dtype=torch.bool).scatter_(1, chosen, True)


@pytest.mark.parametrize(("num_classes", "k"), [(C, 5), (C, 15), (5000, 100)])
def test_rss_classes_are_label_then_background_then_distinct_identities(num_classes, k):
    # (20, 5) and (5000, 100) draw by rejection; (20, 15) has K over half of C (dense path).
    torch.manual_seed(0)
    loss = RandomSamplingSoftmaxLoss(num_classes, D, k=k)
    targets = torch.tensor([0, 7, num_classes - 1, num_classes, num_classes, 3] * 50)
    chosen = loss.sample_classes(targets)
    assert chosen.shape == (len(targets), k) and chosen.dtype == torch.long
    assert torch.equal(chosen[:, 0], targets)  # the label first
    labelled = targets < num_classes
    assert (chosen[labelled, 1] == num_classes).all()  # then the background
    mask = sampled_mask(chosen, num_classes)
    assert (mask.sum(dim=1) == k).all()  # no class twice in a row
    assert mask[:, num_classes].all()
    assert ((chosen >= 0) & (chosen <= num_classes)).all()


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
    # RSS: the same logits, restricted to each sample's K classes (label in column 0); its
    # accuracy is over those K classes.
    rss = RandomSamplingSoftmaxLoss(C, D, k=5, scale=scale)
    rss.load_state_dict(full.state_dict())
    torch.manual_seed(1)
    chosen = rss.sample_classes(labels)
    logits = full.classifier(scale * features).gather(1, chosen)
    torch.manual_seed(1)
    value, acc = rss(features, labels)
    torch.testing.assert_close(value, F.cross_entropy(logits, 0 * labels))
    torch.testing.assert_close(acc, (logits.argmax(dim=1) == 0).float().mean())


def chi_square_of_counts(counts: torch.Tensor) -> tuple[float, float]:
    """(statistic, 0.999 quantile) of counts that should be equal in every bin."""
    counts = counts.double()
    expected = counts.mean()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return statistic, float(chi2.ppf(0.999, len(counts) - 1))


def other_identity_counts(chosen: torch.Tensor, label: int, num_classes: int) -> torch.Tensor:
    """How often each identity other than `label` was drawn (background row: all C)."""
    first_drawn = 2 if label < num_classes else 1
    counts = torch.bincount(chosen[:, first_drawn:].flatten(), minlength=num_classes + 1)
    keep = torch.ones(num_classes + 1, dtype=torch.bool)
    keep[num_classes] = False
    keep[label] = False
    return counts[keep]


@pytest.mark.parametrize(("num_classes", "k"), [(200, 10), (12, 10)])  # rejection, dense
@pytest.mark.parametrize("label", [4, "background"])
def test_rss_samples_the_other_identities_uniformly(num_classes, k, label):
    label = num_classes if label == "background" else label
    torch.manual_seed(0)
    loss = RandomSamplingSoftmaxLoss(num_classes, D, k=k)
    chosen = loss.sample_classes(torch.full((20000,), label))
    counts = other_identity_counts(chosen, label, num_classes)
    drawn = k - 2 if label < num_classes else k - 1
    assert int(counts.sum()) == 20000 * drawn  # never the label or the background again
    statistic, limit = chi_square_of_counts(counts)
    assert statistic < limit, (statistic, limit)


def test_the_uniformity_check_rejects_a_slightly_biased_sampler(monkeypatch):
    """The chi-square check above has the power to see a 20% preference for some identities."""

    def biased(high: torch.Tensor, count: int) -> torch.Tensor:
        weights = torch.ones(len(high), int(high.max()))
        weights[:, : weights.shape[1] // 2] = 1.2
        return torch.multinomial(weights, count, replacement=False)

    monkeypatch.setattr(losses, "distinct_uniform", biased)
    torch.manual_seed(0)
    loss = RandomSamplingSoftmaxLoss(200, D, k=10)
    chosen = loss.sample_classes(torch.full((20000,), 4))
    statistic, limit = chi_square_of_counts(other_identity_counts(chosen, 4, 200))
    assert statistic > limit


def test_rss_never_builds_an_n_by_c_tensor_at_a_million_identities():
    """C = 1,000,000, N = 256: [N, C+1] would be 1 GB of float32 (256 MB as a bool mask)."""
    num_classes, n, k = 1_000_000, 256, 100
    torch.manual_seed(0)
    loss = RandomSamplingSoftmaxLoss(num_classes, 4, k=k)
    features = unit_features(n, dim=4).requires_grad_(True)
    labels = torch.randint(0, num_classes + 1, (n,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value, _ = loss(features, labels)
        value.backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    weight_bytes = loss.classifier.weight.numel() * 4
    assert largest >= weight_bytes  # the profiler saw the dense weight gradient being made...
    assert largest < n * (num_classes + 1)  # ...and nothing of N x (C+1) elements, even bool
    assert torch.isfinite(value) and features.grad.any()


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
    loss = build(LossConfig(reid_loss=kind, rss_k=5))
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


def sequential_table_update(lut, features, labels, momentum):
    """The OIM rule as a plain loop: v <- normalise(m v + (1-m) x), one sample after another."""
    lut = lut.clone()
    for feature, label in zip(features, labels.tolist(), strict=True):
        if 0 <= label < len(lut):
            lut[label] = F.normalize(momentum * lut[label] + (1 - momentum) * feature, dim=0)
    return lut


def test_oim_vectorised_update_equals_the_sequential_rule_with_duplicate_labels():
    generator = torch.Generator().manual_seed(0)
    loss = OIMLoss(C, D, queue_size=4, momentum=0.5, scalar=10.0).train()
    loss.lut.copy_(F.normalize(torch.randn(C, D, generator=generator), dim=1))
    before = loss.lut.clone()
    # 64 RoIs over 5 identities (one of them 20 times), background and unlabelled ones
    labels = torch.tensor([3] * 20 + [0, 0, 7, 7, 7, 19] + [C] * 10 + [-1] * 28)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    features = unit_features(len(labels), seed=1)
    loss(features, labels)
    expected = sequential_table_update(before, features, labels, 0.5)
    torch.testing.assert_close(loss.lut, expected)
    # the order of duplicates matters (each step renormalises), and it is batch order
    reversed_order = sequential_table_update(before, features.flip(0), labels.flip(0), 0.5)
    assert not torch.allclose(loss.lut[3], reversed_order[3])


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
