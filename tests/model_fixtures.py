"""Small model settings and a synthetic batch shared by the models' tests."""

from __future__ import annotations

from typing import Any

import torch

from psearch.models.joint import build_joint_net

NUM_CLASSES = 6


def tiny_settings(**overrides) -> dict[str, Any]:
    """Keyword arguments of a small, fast JointNet (IDNet's builder takes them too)."""
    settings = dict(
        min_size=128,
        max_size=160,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=64,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=32,
        roi_batch_size_per_image=32,
        feat_dim=32,
        head_dim=64,
    )
    settings.update(overrides)
    return settings


def synthetic_batch(seed: int = 0):
    """Two noisy images with plain-coloured 'persons': ids 0 and 1, one unlabelled, none."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 128, 160, generator=generator) * 0.3 for _ in range(2)]
    boxes = [
        torch.tensor([[10.0, 20.0, 40.0, 100.0], [90.0, 10.0, 120.0, 90.0]]),
        torch.zeros(0, 4),
    ]
    labels = [torch.tensor([0, -1]), torch.zeros(0, dtype=torch.int64)]
    images[1] = images[1][:, :120, :150]  # a second size, exercising batching and resizing
    boxes[1] = torch.tensor([[60.0, 15.0, 95.0, 110.0]])
    labels[1] = torch.tensor([1])
    colours = {0: (0.9, 0.1, 0.1), -1: (0.1, 0.9, 0.1), 1: (0.1, 0.1, 0.9)}
    for image, image_boxes, image_labels in zip(images, boxes, labels, strict=True):
        for (x1, y1, x2, y2), label in zip(
            image_boxes.int().tolist(), image_labels.tolist(), strict=True
        ):
            image[:, y1:y2, x1:x2] = torch.tensor(colours[label]).view(3, 1, 1)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
    return images, targets


def trained_joint():
    """A small JointNet (OIM loss) after one training forward: OIM buffers and batch-norm
    statistics are filled, so its outputs depend on its inputs."""
    torch.manual_seed(0)
    loss = {"reid_loss": "oim", "oim_queue_size": 8}
    net = build_joint_net(NUM_CLASSES, loss=loss, **tiny_settings())
    images, targets = synthetic_batch()
    net.train()(images, targets)
    return net.eval()


def assert_same_outputs(a, b) -> None:
    """Two JointNets give bit-identical detections and query features."""
    images, targets = synthetic_batch()
    with torch.no_grad():
        for da, db in zip(a(images), b(images), strict=True):
            for key in ("boxes", "scores", "features"):
                assert torch.equal(da[key], db[key]), key
    boxes = [t["boxes"] for t in targets]
    for fa, fb in zip(
        a.query_features(images, boxes), b.query_features(images, boxes), strict=True
    ):
        assert torch.equal(fa, fb)


def he_init(net, seed: int = 0, gain: float = 0.9):
    """Re-draw a JointNet's trunk, RoI head, detection score and RPN objectness with He-normal
    weights (times `gain`), in place: the stored init gives every detection the same score,
    and NMS breaks such ties by order. Returns the net."""
    generator = torch.Generator().manual_seed(seed)
    layers = [*net.backbone.modules(), *net.roi_head.modules(), net.det_score]
    with torch.no_grad():
        for layer in [*layers, net.rpn.head.cls_logits]:
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                std = gain * (2 / layer.weight[0].numel()) ** 0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
    return net
