"""Model files: save/load round trips and bad files (the MLflow round trip: test_serving.py)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import NUM_CLASSES, assert_same_outputs, tiny_settings, trained_joint

from psearch.errors import PsearchError
from psearch.models.idnet import IDNet, build_idnet
from psearch.models.io import load_model, save_model
from psearch.models.joint import JointNet, build_joint_net


@pytest.fixture(scope="module")
def joint() -> JointNet:
    return trained_joint()


def test_joint_round_trip_through_a_file_and_a_directory(tmp_path, joint):
    path = save_model(tmp_path / "out" / "model.pt", joint, {"epoch": 2, "data_version": "abc"})
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.pt"]
    raw = torch.load(path, weights_only=True)  # only plain types and tensors
    assert raw["format"] == "psearch-joint/1" and raw["num_classes"] == NUM_CLASSES
    assert raw["model_config"]["feat_dim"] == 32 and raw["loss_config"]["reid_loss"] == "oim"
    model, meta = load_model(path)
    assert isinstance(model, JointNet) and not model.training
    assert meta == {"epoch": 2, "data_version": "abc"}
    assert model.model_settings == joint.model_settings
    assert model.loss_settings == joint.loss_settings
    assert torch.equal(model.reid_loss.queue, joint.reid_loss.queue)
    assert_same_outputs(joint, model)
    from_dir, _ = load_model(str(tmp_path / "out"))
    expected = joint.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in from_dir.state_dict().items())


def test_idnet_round_trip(tmp_path):
    torch.manual_seed(0)
    idnet = build_idnet(NUM_CLASSES, **tiny_settings()).eval()
    save_model(tmp_path / "idnet.pt", idnet, {"crop_height": 96, "crop_width": 48})
    model, meta = load_model(tmp_path)  # a directory holding idnet.pt
    assert isinstance(model, IDNet) and meta["crop_width"] == 48
    crops = torch.rand(3, 3, 96, 48)
    with torch.no_grad():
        assert torch.equal(model.features(crops), idnet.features(crops))


def test_saved_model_does_not_reload_backbone_weights(tmp_path, joint):
    # A model trained from a weights file loads where that file no longer exists.
    from torchvision import models

    weights = tmp_path / "mnv3.pth"
    torch.save(models.mobilenet_v3_large().state_dict(), weights)
    net = build_joint_net(NUM_CLASSES, **tiny_settings(backbone_weights=str(weights)))
    save_model(tmp_path / "model.pt", net, {})
    weights.unlink()
    model, _ = load_model(tmp_path / "model.pt")
    assert torch.equal(
        model.backbone.body[5].block[0][0].weight, net.backbone.body[5].block[0][0].weight
    )


def test_a_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_model(tmp_path / "model.pt", torch.nn.Linear(2, 2), {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"not a checkpoint", "not a readable psearch model file"),
        ({"format": "psearch-joint/1"}, "not a psearch model file"),
        ("wrong-format", "unknown model format 'other/9'"),
        ("bad-config", "stored config is invalid"),
        ("bad-loss", "stored config is invalid"),
        ("bad-weights", "weights do not match the stored config"),
    ],
)
def test_bad_model_files_are_user_errors_naming_the_file(tmp_path, joint, content, fragment):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        torch.save(content, path)
    else:
        save_model(path, joint, {})
        checkpoint = torch.load(path, weights_only=True)
        if content == "wrong-format":
            checkpoint["format"] = "other/9"
        elif content == "bad-config":
            checkpoint["model_config"]["no_such_key"] = 1
        elif content == "bad-loss":
            checkpoint["loss_config"]["reid_loss"] = "triplet"
        else:
            checkpoint["model_config"]["feat_dim"] = 64
        torch.save(checkpoint, path)
    with pytest.raises(PsearchError) as info:
        load_model(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(PsearchError, match="model file not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(PsearchError, match="no model.pt or idnet.pt"):
        load_model(tmp_path)
