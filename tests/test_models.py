"""The joint net and its backbones: output shapes in every mode, gradient routing, learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_fixtures import NUM_CLASSES, he_init, synthetic_batch, tiny_settings
from torchvision import models
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import FrozenBatchNorm2d

from psearch.config import LossConfig, ModelConfig
from psearch.errors import PsearchError
from psearch.models.backbones import build_backbone
from psearch.models.joint import INFERENCE_SETTINGS, JointNet, build_joint_net

RSS4 = {"reid_loss": "rss", "rss_k": 4}


@pytest.fixture(scope="module")
def net() -> JointNet:
    torch.manual_seed(0)
    return build_joint_net(NUM_CLASSES, loss=RSS4, **tiny_settings())


def test_attributes(net):
    assert net.num_classes == NUM_CLASSES
    assert net.feat_dim == 32
    assert net.model_settings["backbone"] == "small" and net.loss_settings["rss_k"] == 4
    assert net.rpn.head.conv.out_channels == 512
    assert net.rpn.anchor_generator.num_anchors_per_location() == [9]


def test_train_mode_returns_scalar_losses_and_accuracies(net):
    images, targets = synthetic_batch()
    net.train()
    out = net(images, targets)
    expected = {"loss_rpn_cls", "loss_rpn_box", "loss_det", "loss_box", "loss_reid"}
    assert expected | {"acc_det", "acc_reid"} == set(out)
    for key, value in out.items():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value)
        if key.startswith("acc_"):
            assert not value.requires_grad and 0.0 <= float(value) <= 1.0
        else:
            assert value.requires_grad and float(value.detach()) >= 0.0


def test_train_mode_needs_targets(net):
    net.train()
    with pytest.raises(ValueError):
        net([torch.rand(3, 64, 64)])


def test_eval_mode_detections(net):
    images, _ = synthetic_batch()
    net.eval()
    with torch.no_grad():
        detections = net(images)
    assert len(detections) == 2
    for image, det in zip(images, detections, strict=True):
        assert set(det) == {"boxes", "scores", "features"}
        k = len(det["scores"])
        assert 0 < k <= net.detections_per_img
        assert det["boxes"].shape == (k, 4) and det["features"].shape == (k, 32)
        assert all(v.dtype == torch.float32 for v in det.values())
        assert ((det["scores"] >= net.box_score_thresh) & (det["scores"] <= 1)).all()
        torch.testing.assert_close(det["features"].norm(dim=1), torch.ones(k))
        # boxes are in the input image's pixels, not the resized ones
        height, width = image.shape[-2:]
        assert (det["boxes"][:, [0, 2]] <= width).all() and (
            det["boxes"][:, [1, 3]] <= height
        ).all()
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()


def test_eval_mode_respects_detection_cap_and_threshold():
    torch.manual_seed(0)
    net = build_joint_net(NUM_CLASSES, **tiny_settings(detections_per_img=3)).eval()
    images, _ = synthetic_batch()
    with torch.no_grad():
        assert all(len(d["boxes"]) <= 3 for d in net(images))
    net.box_score_thresh = 1.01  # nothing can pass: empty but well-shaped outputs
    with torch.no_grad():
        det = net(images)[0]
    assert det["boxes"].shape == (0, 4) and det["features"].shape == (0, 32)


def test_query_features(net):
    images, targets = synthetic_batch()
    net.eval()
    features = net.query_features(images, [t["boxes"] for t in targets])
    assert [f.shape for f in features] == [(2, 32), (1, 32)]
    torch.testing.assert_close(features[0].norm(dim=1), torch.ones(2))
    # a box's feature does not depend on the other boxes asked with it
    alone = net.query_features(images[:1], [targets[0]["boxes"][1:]])[0]
    torch.testing.assert_close(alone[0], features[0][1], atol=1e-5, rtol=1e-5)
    empty = net.query_features(images[:1], [torch.zeros(0, 4)])
    assert empty[0].shape == (0, 32)


def test_reid_loss_does_not_reach_the_proposal_network(net):
    images, targets = synthetic_batch()
    net.train()
    net.zero_grad()
    net(images, targets)["loss_reid"].backward()
    for name, param in net.rpn.named_parameters():
        assert param.grad is None or not param.grad.any(), name
    trunk_grads = [p.grad for p in net.backbone.parameters() if p.grad is not None]
    assert trunk_grads and any(g.any() for g in trunk_grads)  # the trunk is shared and learns
    net.zero_grad()
    net(images, targets)["loss_rpn_cls"].backward()
    assert net.rpn.head.cls_logits.weight.grad.any()


@pytest.mark.parametrize("roi_op", ["roi_pool", "roi_align"])
@pytest.mark.parametrize("loss", ["rss", "softmax", "oim"])
def test_every_roi_op_and_loss_trains_and_detects(roi_op, loss):
    torch.manual_seed(0)
    net = build_joint_net(NUM_CLASSES, loss={"reid_loss": loss}, **tiny_settings(roi_op=roi_op))
    images, targets = synthetic_batch()
    out = net.train()(images, targets)
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    with torch.no_grad():
        assert net.eval()(images)[0]["features"].shape[1] == 32


@pytest.mark.parametrize("roi_op", ["roi_pool", "roi_align"])
def test_bf16_autocast_train_and_eval(roi_op):
    # The trainer's default amp mode; CPU RoI kernels have no bf16 version.
    torch.manual_seed(0)
    net = build_joint_net(NUM_CLASSES, **tiny_settings(roi_op=roi_op))
    images, targets = synthetic_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.train()(images, targets)
    assert all(torch.isfinite(v) for v in out.values())
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        det = net.eval()(images)[0]
    assert det["features"].dtype == torch.float32
    torch.testing.assert_close(det["features"].norm(dim=1), torch.ones(len(det["features"])))


def test_bf16_autocast_keeps_anchors_proposals_and_box_targets_float32():
    # bf16 has 8 significant bits: past 512 px it can only say every 4th pixel. Boxes must
    # stay float32 under autocast (CPU autocast stands in for CUDA's here).
    torch.manual_seed(0)
    net = build_joint_net(NUM_CLASSES, **tiny_settings(min_size=600, max_size=1000))
    images = [torch.rand(3, 600, 1000)]
    targets = [{"boxes": torch.tensor([[613.3, 101.7, 701.9, 377.1]]), "labels": torch.tensor([1])}]
    seen: dict[str, list[torch.Tensor]] = {"anchors": [], "proposals": [], "targets": []}
    net.rpn.anchor_generator.register_forward_hook(lambda _m, _i, out: seen["anchors"].extend(out))
    net.rpn.register_forward_hook(lambda _m, _i, out: seen["proposals"].extend(out[0]))
    sample = net._sample_rois

    def recording_sample(proposals, targets):
        sampled = sample(proposals, targets)
        seen["targets"].append(sampled[3])  # the box regression targets
        return sampled

    net._sample_rois = recording_sample
    net.train()(images, targets)  # float32 reference
    reference_anchors = seen["anchors"][0]
    for values in seen.values():
        values.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(images, targets)
    for name, values in seen.items():
        assert values and all(v.dtype == torch.float32 for v in values), name
    torch.testing.assert_close(seen["anchors"][0], reference_anchors, rtol=0, atol=0)
    # Exact to the float32 pixel: a bf16 round trip would move anchors far right by 1-2 px.
    far = reference_anchors[:, 2] > 600
    assert (reference_anchors[far, 2] != reference_anchors[far, 2].bfloat16().float()).any()


@pytest.mark.parametrize("kind, channels, width", [("vgg16", 512, 4096), ("resnet50", 1024, 2048)])
def test_paper_backbones_build_and_run(kind, channels, width):
    torch.manual_seed(0)
    settings = tiny_settings(backbone=kind, min_size=64, max_size=96, roi_batch_size_per_image=8)
    net = build_joint_net(NUM_CLASSES, **settings)
    assert net.backbone.out_channels == channels and net.roi_head.out_features == width
    trunk_out = net.backbone(torch.rand(1, 3, 64, 96))
    assert trunk_out.shape == (1, channels, 4, 6)  # stride 16
    images = [torch.rand(3, 64, 80)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 60.0]]), "labels": torch.tensor([1])}]
    assert torch.isfinite(net.train()(images, targets)["loss_reid"])
    with torch.no_grad():
        det = net.eval()(images)[0]
    assert det["features"].shape[1] == 32 and det["boxes"].shape[1] == 4


def test_small_backbone_shapes():
    trunk, head = build_backbone(head_dim=64)
    feature_map = trunk(torch.rand(2, 3, 96, 64))
    assert feature_map.shape == (2, trunk.out_channels, 6, 4)
    assert head(torch.rand(5, trunk.out_channels, 7, 7)).shape == (5, head.out_features)
    assert head.out_features == 64


def test_backbone_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    reference = models.mobilenet_v3_large()
    path = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), path)
    trunk, _ = build_backbone(backbone_weights=str(path))
    torch.testing.assert_close(
        trunk.body[5].block[0][0].weight, reference.features[5].block[0][0].weight
    )
    assert any(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules())
    assert not trunk.body[0][0].weight.requires_grad  # the stem stays fixed
    # load_weights=False: same architecture (frozen norms), random values, file untouched
    bare, _ = build_backbone(backbone_weights=str(path), load_weights=False)
    assert [type(m) for m in bare.modules()] == [type(m) for m in trunk.modules()]


@pytest.mark.parametrize(
    "weights, fragment",
    [("NOT_A_WEIGHTS_NAME", "neither a file nor"), ("resnet", "not a state dict of torchvision")],
)
def test_bad_backbone_weights_are_user_errors(tmp_path, weights, fragment):
    if weights == "resnet":
        weights = str(tmp_path / "resnet18.pth")
        torch.save(models.resnet18().state_dict(), weights)
    with pytest.raises(PsearchError, match=fragment):
        build_backbone(backbone_weights=weights)


def test_network_defaults_are_the_params_defaults():
    # A model file stores the network's keyword arguments; a missing one takes the default,
    # which must be what the params would have said.
    torch.manual_seed(0)
    net = JointNet(NUM_CLASSES)
    assert net.model_settings == dataclasses.asdict(ModelConfig())
    torch.manual_seed(0)
    from_params = build_joint_net(
        NUM_CLASSES, loss=dataclasses.asdict(LossConfig()), **dataclasses.asdict(ModelConfig())
    )
    assert from_params.loss_settings == dataclasses.asdict(LossConfig())
    expected = net.state_dict()
    assert list(from_params.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in from_params.state_dict().items())


def test_multi_scale_training_draws_train_sizes_and_tests_at_min_size(net):
    transform = net.transform
    image = torch.rand(3, 100, 100)  # square: the shorter side is the size drawn
    try:
        net.train_sizes = [64, 80]
        transform.train()
        torch.manual_seed(0)
        drawn = {transform([image])[0].image_sizes[0][0] for _ in range(40)}
        assert drawn == {64, 80}
        transform.eval()  # test time ignores the training sizes
        assert transform([image])[0].image_sizes[0][0] == net.min_size
        net.train_sizes = []  # single scale again: training also uses min_size
        transform.train()
        assert transform([image])[0].image_sizes[0][0] == net.min_size
    finally:
        net.train_sizes = []
        net.train()


def test_sampled_rois_name_the_box_they_match(net):
    # Two images with two boxes each: the second image's boxes are 2 and 3 of all boxes.
    boxes = torch.tensor([[10.0, 20.0, 40.0, 100.0], [90.0, 10.0, 120.0, 90.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, -1])} for _ in range(2)]
    proposals = [
        torch.tensor([[12.0, 22.0, 41.0, 98.0], [88.0, 12.0, 121.0, 88.0], [50.0, 0, 80, 30]]),
        torch.tensor([[91.0, 11.0, 119.0, 92.0], [0.0, 100.0, 20.0, 127.0]]),
    ]
    rois, det_labels, _reid, _deltas, box_index = net._sample_rois(proposals, targets)
    assert (box_index >= 0).tolist() == (det_labels > 0).tolist()
    offsets = [0, 2]
    start = 0
    for image, image_rois in enumerate(rois):
        index = box_index[start : start + len(image_rois)]
        start += len(image_rois)
        foreground = index >= 0
        assert foreground.any() and (~foreground).any()
        iou = box_ops.box_iou(image_rois[foreground], boxes)
        assert (index[foreground] - offsets[image]).tolist() == iou.argmax(1).tolist()
        assert (iou.max(1).values >= 0.5).all()


def test_only_rois_close_to_their_box_are_distilled(net):
    boxes = torch.tensor([[10.0, 20.0, 40.0, 100.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0])}]
    # IoU with the box: 0.86 (close), 0.625 (loose, still a person RoI), 0 (background).
    proposals = [
        torch.tensor([[12.0, 22.0, 41.0, 98.0], [10.0, 20.0, 40.0, 70.0], [60, 0, 90, 80]])
    ]
    try:
        for threshold, distilled in ((0.5, 3), (0.7, 2), (1.0, 1)):  # the box itself is a RoI
            net.distill_iou = threshold
            rois, det_labels, _reid, _deltas, box_index = net._sample_rois(proposals, targets)
            assert int((det_labels > 0).sum()) == 3  # detection's foreground does not change
            assert int((box_index >= 0).sum()) == distilled, threshold
            iou = box_ops.box_iou(rois[0][box_index >= 0], boxes)
            assert (iou >= threshold - 1e-6).all()
    finally:
        net.distill_iou = 0.5


def test_distillation_loss_pulls_the_roi_features_only(net):
    images, targets = synthetic_batch()
    net.train()
    assert "loss_distill" not in net(images, targets)  # weight 0: the paper's four losses
    torch.manual_seed(0)
    for target in targets:
        teacher = torch.randn(len(target["boxes"]), net.feat_dim)
        target["teacher"] = torch.nn.functional.normalize(teacher, dim=1)
    try:
        net.distill_weight = 2.0
        net.zero_grad()
        loss = net(images, targets)["loss_distill"]
        # 2 x (1 - cosine), cosines of random directions near 0
        assert 1.0 < float(loss) < 3.0
        loss.backward()
        assert net.embedding.weight.grad.abs().sum() > 0
        assert net.det_score.weight.grad is None and net.box_regressor.weight.grad is None
    finally:
        net.distill_weight = 0.0
        net.zero_grad()


def test_inference_settings_are_attributes_of_a_built_net():
    changed = {
        "min_size": 96,
        "max_size": 128,
        "rpn_pre_nms_top_n_test": 50,
        "rpn_post_nms_top_n_test": 12,
        "rpn_nms_thresh": 0.5,
        "box_score_thresh": 0.2,
        "box_nms_thresh": 0.3,
        "detections_per_img": 4,
        "test_scale_factors": [0.75, 1.0],
        "test_flip": True,
    }
    assert set(changed) == set(INFERENCE_SETTINGS)
    torch.manual_seed(0)
    built = build_joint_net(NUM_CLASSES, **tiny_settings(**changed)).eval()
    torch.manual_seed(0)
    net = build_joint_net(NUM_CLASSES, **tiny_settings()).eval()
    images, _ = synthetic_batch()
    with torch.no_grad():
        before = net(images)
        net.set_inference_settings(**changed)
        after, expected = net(images), built(images)
    assert net.model_settings == built.model_settings
    assert [len(d["boxes"]) for d in before] != [len(d["boxes"]) for d in after]
    for got, want in zip(after, expected, strict=True):
        for key in ("boxes", "scores", "features"):
            assert torch.equal(got[key], want[key]), key
    with pytest.raises(TypeError, match="'anchor_sizes' is not an inference setting"):
        net.set_inference_settings(anchor_sizes=[8])


@pytest.fixture(scope="module")
def distinct_net() -> JointNet:
    """A He-initialised net: its features differ from box to box and from view to view (the
    stored init's nearly do not), so a wrong view would show."""
    torch.manual_seed(0)
    settings = tiny_settings(test_scale_factors=[], test_flip=False)  # one view unless set
    return he_init(build_joint_net(NUM_CLASSES, **settings)).eval()


def _features(net, images, boxes, scale_factors=(), flip=False):
    net.set_inference_settings(test_scale_factors=list(scale_factors), test_flip=flip)
    try:
        return torch.cat(net.query_features(images, boxes))
    finally:
        net.set_inference_settings(test_scale_factors=[], test_flip=False)


def test_test_views_average_the_features_of_each_scale_and_the_mirror_image(distinct_net):
    net = distinct_net
    images, targets = synthetic_batch()
    boxes = [t["boxes"] for t in targets]
    single = _features(net, images, boxes)
    # The mirror view by hand: mirrored images, boxes mirrored within each image's width.
    mirrored = _features(
        net,
        [image.flip(-1) for image in images],
        [
            torch.stack([i.shape[-1] - b[:, 2], b[:, 1], i.shape[-1] - b[:, 0], b[:, 3]], 1)
            for i, b in zip(images, boxes, strict=True)
        ],
    )
    # The 0.75 view by hand: the net's own scale set to 0.75 x (128, 160).
    net.set_inference_settings(min_size=96, max_size=120)
    smaller = _features(net, images, boxes)
    net.set_inference_settings(min_size=128, max_size=160)
    assert (single * mirrored).sum(1).max() < 0.999 and (single * smaller).sum(1).max() < 0.999

    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    torch.testing.assert_close(_features(net, images, boxes, flip=True), unit(single + mirrored))
    torch.testing.assert_close(_features(net, images, boxes, [1.0, 0.75]), unit(single + smaller))
    both = _features(net, images, boxes, [0.75, 1.0], flip=True)
    assert both.shape == single.shape
    torch.testing.assert_close(both.norm(dim=1), torch.ones(len(both)))


def test_detections_carry_the_mean_view_features_of_their_boxes(distinct_net):
    """Detection runs once; its boxes' features are what query_features gives for them."""
    net = distinct_net
    images, _ = synthetic_batch()
    with torch.no_grad():
        plain = net(images)
        net.set_inference_settings(test_scale_factors=[0.75, 1.0], test_flip=True)
        try:
            viewed = net(images)
            again = net.query_features(images, [d["boxes"] for d in viewed])
        finally:
            net.set_inference_settings(test_scale_factors=[], test_flip=False)
    for before, after, expected in zip(plain, viewed, again, strict=True):
        assert len(after["boxes"]) > 0
        assert torch.equal(before["boxes"], after["boxes"])
        assert torch.equal(before["scores"], after["scores"])
        assert not torch.allclose(before["features"], after["features"], atol=1e-3)
        torch.testing.assert_close(after["features"], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "settings, fragment",
    [({"backbone": "alexnet"}, "model.backbone: unknown"), ({"roi_op": "crop"}, "model.roi_op")],
)
def test_unknown_backbone_or_roi_op_is_an_error(settings, fragment):
    with pytest.raises(PsearchError, match=fragment):
        build_joint_net(NUM_CLASSES, **tiny_settings(**settings))


@pytest.mark.slow
def test_a_few_optimiser_steps_lower_the_loss():
    torch.manual_seed(0)
    net = build_joint_net(NUM_CLASSES, loss=RSS4, **tiny_settings()).train()
    images, targets = synthetic_batch()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(25):
        out = net(images, targets)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        totals.append(float(total))
    first, last = sum(totals[:3]) / 3, sum(totals[-3:]) / 3
    assert last < 0.7 * first, totals
