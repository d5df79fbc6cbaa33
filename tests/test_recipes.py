"""The named recipes in configs/: the cited values are the specification (a silent edit
fails here), every departure from the defaults says where it comes from, the PRW variants
differ only where PRW does, `psearch config` writes them, and each one builds and trains a
step at its real input size."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision import models

from psearch.cli.recipes import changed_values
from psearch.config import Params, flatten, load_params
from psearch.models.backbones import FrozenStatsBatchNorm2d
from psearch.models.joint import build_joint_net
from psearch.synth.drawing import render
from psearch.synth.plan import plan_dataset
from psearch.train.engine import build_optimizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# What the sources say (configs/*.yaml cite where); each value checked in its recipe.
PAPER = {
    "model.backbone": "vgg16",
    "model.backbone_weights": "IMAGENET1K_V1",
    "model.freeze_blocks": 2,
    "model.feat_dim": 256,
    "model.roi_op": "roi_pool",
    "model.roi_size": 7,
    "model.anchor_sizes": [128, 256, 512],
    "model.anchor_ratios": [2.0, 3.0, 4.0],
    "model.rpn_pre_nms_top_n_train": 12000,
    "model.rpn_post_nms_top_n_train": 2000,
    "model.rpn_pre_nms_top_n_test": 6000,
    "model.rpn_post_nms_top_n_test": 300,
    "model.rpn_nms_thresh": 0.7,
    "model.roi_batch_size_per_image": 128,
    "model.roi_positive_fraction": 0.25,
    "model.box_nms_thresh": 0.4,
    "model.min_size": 600,
    "model.max_size": 1000,
    "pretrain.enabled": True,
    "pretrain.crop_height": 224,
    "pretrain.crop_width": 224,
    "pretrain.crop_context": 1.0,
    "pretrain.batch_size": 256,
    "pretrain.max_iters": 30000,
    "pretrain.lr": 0.001,
    "pretrain.lr_steps": [20000],
    "pretrain.background_ratio": 1.0,
    "pretrain.loss.reid_loss": "softmax",
    "pretrain.loss.softmax_scale": 1.0,
    "train.batch_size": 2,
    "train.max_iters": 120000,
    "train.lr": 0.001,
    "train.lr_steps": [100000],
    "train.momentum": 0.9,
    "train.weight_decay": 0.0005,
    "train.hflip": 0.5,
    "train.loss.reid_loss": "rss",
    "train.loss.rss_k": 100,
    "train.loss.softmax_scale": 1.0,
    "evaluate.det_thresh": 0.5,
    "evaluate.cross_camera": False,
    "ingest.format": "cuhk-sysu",
}
OIM = {
    "model.backbone": "resnet50",
    "model.backbone_weights": "IMAGENET1K_V1",
    "model.freeze_blocks": 1,
    "model.batch_norm": "frozen_stats",
    "model.feat_dim": 256,
    "model.roi_size": 14,
    "model.anchor_sizes": [128, 256, 512],
    "model.anchor_ratios": [2.0, 3.0, 4.0],
    "model.roi_positive_fraction": 0.25,
    "model.box_nms_thresh": 0.4,
    "model.min_size": 600,
    "model.max_size": 1000,
    "pretrain.enabled": False,
    "train.max_iters": 50000,
    "train.lr": 0.001,
    "train.lr_steps": [40000],
    "train.loss.reid_loss": "oim",
    "train.loss.oim_momentum": 0.5,
    "train.loss.oim_scalar": 10.0,
    "train.loss.oim_queue_size": 5000,
    "evaluate.cross_camera": False,
    "ingest.format": "cuhk-sysu",
}
PRW = {"ingest.format": "prw", "evaluate.cross_camera": True}
RECIPES = {
    "paper-vgg16-rss": PAPER,
    "paper-vgg16-rss-prw": {**PAPER, **PRW},
    "oim-resnet50": OIM,
    "oim-resnet50-prw": {**OIM, **PRW, "train.loss.oim_queue_size": 500},
}


def recipe(name: str) -> Params:
    return load_params(CONFIGS / f"{name}.yaml")


def test_every_recipe_file_is_listed_here():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_holds_the_cited_values(name):
    values = flatten(recipe(name))
    wrong = {k: (values[k], v) for k, v in RECIPES[name].items() if values[k] != v}
    assert not wrong, f"{name}: (recipe, source) differ: {wrong}"


def _commented_keys(text: str) -> set[str]:
    """Dotted keys whose line carries a comment, or that a comment line introduces."""
    keys, stack, previous_comment = set(), [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            previous_comment = True
            continue
        match = re.match(r"^( *)([A-Za-z_]+):", line)
        if not match:
            previous_comment = False
            continue
        depth = len(match.group(1)) // 2
        stack = [*stack[:depth], match.group(2)]
        if "#" in line or previous_comment:
            keys.add(".".join(stack))
        previous_comment = False
    return keys


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_departure_from_the_defaults_carries_a_comment(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    commented = _commented_keys(text)
    for key in changed_values(CONFIGS / f"{name}.yaml"):
        parents = [".".join(key.split(".")[:i]) for i in range(2, key.count(".") + 2)]
        assert any(p in commented for p in parents), f"{name}: {key} has no source comment"


@pytest.mark.parametrize("base", ["paper-vgg16-rss", "oim-resnet50"])
def test_prw_variants_differ_only_where_prw_does(base):
    a, b = flatten(recipe(base)), flatten(recipe(f"{base}-prw"))
    differ = {key for key in a if a[key] != b[key]}
    expected = set(PRW) | ({"train.loss.oim_queue_size"} if base.startswith("oim") else set())
    assert differ == expected


def test_a_recipe_file_rejects_a_key_given_twice(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n")
    with pytest.raises(Exception, match="'train' appears twice"):
        load_params(bad)


def _psearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "psearch", *args], cwd=cwd, capture_output=True, text=True
    )


def test_config_use_writes_the_recipe_verbatim_and_list_names_them(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    done = _psearch("config", "use", "oim-resnet50", "--dir", str(CONFIGS), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "params.yaml").read_text() == (CONFIGS / "oim-resnet50.yaml").read_text()
    assert '"pretrain": "skipped' in done.stdout
    listed = _psearch("config", "list", "--dir", str(CONFIGS), cwd=tmp_path)
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == sorted(RECIPES)


def test_config_use_refuses_an_unknown_or_invalid_recipe(tmp_path):
    before = "train:\n  lr: 0.5\n"
    (tmp_path / "params.yaml").write_text(before)
    done = _psearch("config", "use", "paper-vgg", "--dir", str(CONFIGS), cwd=tmp_path)
    assert done.returncode == 2 and "no such recipe" in done.stderr
    (tmp_path / "bad.yaml").write_text("train:\n  lr_steps: 100\n")
    done = _psearch("config", "use", "bad.yaml", cwd=tmp_path)
    assert done.returncode == 2 and "train.lr_steps: expected a list" in done.stderr
    assert (tmp_path / "params.yaml").read_text() == before  # untouched


# ------------------------------------------------------------------ the recipes' networks


def _real_size_scene():
    """One training scene of the paper-scale synthetic preset, drawn as `psearch synth` does
    (its first scene with a labelled person: CUHK-SYSU-like size, persons 50-500 px)."""
    plan = plan_dataset("paper-scale", 0)
    scene = next(
        s for s in plan.scenes if s.split == "train" and any(f.identity >= 0 for f in s.figures())
    )
    image = torch.from_numpy(np.asarray(render(scene, plan.seed))).permute(2, 0, 1)
    figures = scene.figures()
    boxes = torch.tensor([(x, y, x + w, y + h) for x, y, w, h in (f.box for f in figures)])
    boxes = boxes.float()
    labels = torch.tensor([f.identity % 5 if f.identity >= 0 else -1 for f in figures])
    return [image.float() / 255], [{"boxes": boxes, "labels": labels}]


def _network(name: str, weights: str | None, **changes):
    params = recipe(name)
    model = dataclasses.replace(params.model, backbone_weights=weights, **changes)
    torch.manual_seed(0)
    return build_joint_net(
        5, loss=dataclasses.asdict(params.train.loss), **dataclasses.asdict(model)
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper-vgg16-rss", "oim-resnet50"])
def test_each_recipe_trains_a_step_at_its_real_input_size(name):
    net = _network(name, None)
    images, targets = _real_size_scene()
    optimizer = build_optimizer(net, recipe(name).train)
    losses = net.train()(images, targets)
    names = {"loss_rpn_cls", "loss_rpn_box", "loss_det", "loss_box", "loss_reid"}
    assert names <= set(losses) and all(torch.isfinite(losses[k]) for k in names)
    sum(losses[k] for k in names).backward()
    optimizer.step()
    assert net.transform.min_size == (600,) and net.transform.max_size == 1000
    assert min(images[0].shape[1:]) >= 576  # a real-resolution scene, not a demo one


def _imagenet_style_file(tmp_path: Path, arch: str) -> str:
    """A random state dict saved as torchvision saves its ImageNet weights."""
    torch.manual_seed(1)
    model = models.get_model(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics unlike a fresh layer's
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def _step(net) -> None:
    images, targets = _real_size_scene()
    images = [torch.nn.functional.interpolate(images[0][None], scale_factor=0.5)[0]]
    targets[0]["boxes"] = targets[0]["boxes"] / 2
    losses = net.train()(images, targets)
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()


def test_vgg16_recipe_with_imagenet_weights_freezes_conv1_and_conv2(tmp_path):
    weights = _imagenet_style_file(tmp_path, "vgg16")
    net = _network("paper-vgg16-rss", weights, min_size=300, max_size=500)
    reference = torch.load(weights, weights_only=True)
    torch.testing.assert_close(net.backbone.body[0].weight, reference["features.0.weight"])
    torch.testing.assert_close(net.roi_head.fc6.weight, reference["classifier.0.weight"])
    _step(net)
    convs = [m for m in net.backbone.body if isinstance(m, torch.nn.Conv2d)]
    for index, conv in enumerate(convs):  # conv1_1, conv1_2, conv2_1, conv2_2 are fixed
        if index < 4:
            assert not conv.weight.requires_grad and conv.weight.grad is None
        else:
            assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_resnet50_recipe_keeps_bn_statistics_and_trains_their_affine(tmp_path):
    weights = _imagenet_style_file(tmp_path, "resnet50")
    net = _network("oim-resnet50", weights, min_size=300, max_size=500)
    norms = [m for m in net.modules() if isinstance(m, FrozenStatsBatchNorm2d)]
    assert len(norms) == 53  # every batch norm of ResNet-50, res5 (the RoI head) included
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    stem = net.backbone.body[0][0]
    _step(net)
    for m, (mean, var) in zip(norms, before, strict=True):
        torch.testing.assert_close(m.running_mean, mean, rtol=0, atol=0)
        torch.testing.assert_close(m.running_var, var, rtol=0, atol=0)
    assert not stem.weight.requires_grad and stem.weight.grad is None  # conv1 fixed
    assert not norms[0].weight.requires_grad  # conv1's own batch norm is fixed with it
    trained = [m for m in norms[1:] if m.weight.grad is not None and m.bias.grad is not None]
    assert len(trained) == len(norms) - 1
    assert net.backbone.body[1][0].conv1.weight.grad is not None  # res2 trains


def test_recipes_parse_as_plain_yaml():
    # The files stay plain YAML any tool reads (DVC, yq), no anchors or tags of ours.
    for path in CONFIGS.glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_config_use_replaces_a_params_file_that_no_longer_validates(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: -1\n")  # broken: use must still fix it
    done = _psearch("config", "use", "paper-vgg16-rss", "--dir", str(CONFIGS), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert load_params(tmp_path / "params.yaml").model.backbone == "vgg16"
