"""IDNet: crop classification, and the transfer of its weights into the joint net."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import NUM_CLASSES, tiny_settings

from psearch.errors import PsearchError
from psearch.models.idnet import IDNet, build_idnet, transfer_idnet_weights
from psearch.models.io import checkpoint_dict, load_model, save_model
from psearch.models.joint import DETECTOR_SETTINGS, build_joint_net


def crops(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, 96, 48, generator=torch.Generator().manual_seed(0))


def test_idnet_train_outputs_and_features():
    torch.manual_seed(0)
    idnet = build_idnet(NUM_CLASSES, loss={"reid_loss": "rss", "rss_k": 4}, **tiny_settings())
    idnet.train()
    out = idnet(crops(), torch.tensor([0, 3, NUM_CLASSES, -1]))
    assert set(out) == {"loss_reid", "acc_reid"}
    assert out["loss_reid"].shape == () and out["loss_reid"].requires_grad
    assert not out["acc_reid"].requires_grad
    out["loss_reid"].backward()
    assert idnet.reid_loss.classifier.weight.grad.any()
    features = idnet.eval().features(crops())
    assert features.shape == (4, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(4))


def test_idnet_learns_to_tell_two_identities_apart():
    torch.manual_seed(0)
    idnet = build_idnet(2, loss={"reid_loss": "softmax"}, **tiny_settings()).train()
    batch = torch.zeros(8, 3, 96, 48)
    batch[:4, 0] = 1.0  # identity 0 is red, identity 1 is blue
    batch[4:, 2] = 1.0
    batch += 0.1 * torch.rand_like(batch)
    labels = torch.tensor([0] * 4 + [1] * 4)
    optimiser = torch.optim.SGD(idnet.parameters(), lr=0.01, momentum=0.9)
    for _ in range(15):
        out = idnet(batch, labels)
        optimiser.zero_grad()
        out["loss_reid"].backward()
        optimiser.step()
    assert float(idnet(batch, labels)["acc_reid"]) == 1.0


def test_transfer_copies_trunk_head_embedding_and_classifier():
    torch.manual_seed(0)
    idnet = build_idnet(NUM_CLASSES, context=2.0, **tiny_settings())
    torch.manual_seed(1)
    joint = build_joint_net(NUM_CLASSES, **tiny_settings())
    rpn_before = {k: v.clone() for k, v in joint.rpn.state_dict().items()}
    copied = transfer_idnet_weights(joint, idnet.state_dict())
    assert any(k.startswith("backbone.") for k in copied)
    assert {"roi_head.fc6.weight", "embedding.weight", "reid_loss.classifier.weight"} <= set(copied)
    joint_state = joint.state_dict()
    for key, value in idnet.state_dict().items():
        if key != "crop_context":  # IDNet's own crop geometry
            assert torch.equal(joint_state[key], value), key
    for key, value in joint.rpn.state_dict().items():
        assert torch.equal(value, rpn_before[key])  # the RPN is not IDNet's to set
    # Both compute the same feature for the person inside a context crop (the crop spans
    # twice the box, so the box is its central half) pooled as one RoI.
    idnet.eval(), joint.eval()
    crop = crops(1)
    expected = idnet.features(crop)
    feature_map = joint.backbone((crop - idnet.mean) / idnet.std)
    person = torch.tensor([[12.0, 24.0, 36.0, 72.0]])
    torch.testing.assert_close(joint.box_features(feature_map, [person], (96, 48)), expected)
    whole = torch.tensor([[0.0, 0.0, 48.0, 96.0]])
    assert not torch.allclose(joint.box_features(feature_map, [whole], (96, 48)), expected)


def test_idnet_context_is_saved_with_the_model(tmp_path):
    path = save_model(tmp_path / "idnet.pt", build_idnet(3, context=1.5, **tiny_settings()))
    assert load_model(path)[0].context == 1.5


def test_the_idnet_builder_leaves_out_the_detector_settings(tmp_path):
    # One set of model settings builds both networks; IDNet keeps only its own, and a file
    # holding the detector settings too (as IDNet files once did) still loads.
    idnet = build_idnet(3, **tiny_settings(backbone_weights=None))
    assert set(idnet.model_settings) == {
        "backbone",
        "backbone_weights",
        "feat_dim",
        "roi_op",
        "roi_size",
        "head_dim",
        "freeze_blocks",
        "batch_norm",
    }
    assert not set(idnet.model_settings) & set(DETECTOR_SETTINGS)
    with pytest.raises(TypeError, match="anchor_sizes"):
        IDNet(3, anchor_sizes=[8])
    checkpoint = checkpoint_dict(idnet)
    checkpoint["model_config"].update(anchor_sizes=[16, 32], box_score_thresh=0.5)
    torch.save(checkpoint, tmp_path / "idnet.pt")
    loaded, _ = load_model(tmp_path / "idnet.pt")
    assert isinstance(loaded, IDNet) and loaded.model_settings == idnet.model_settings


def test_transfer_accepts_a_saved_checkpoint_and_skips_another_loss_kind():
    idnet = build_idnet(NUM_CLASSES, loss={"reid_loss": "rss"}, **tiny_settings())
    joint = build_joint_net(NUM_CLASSES, loss={"reid_loss": "oim"}, **tiny_settings())
    copied = transfer_idnet_weights(joint, checkpoint_dict(idnet, {"epoch": 1}))
    assert not any(k.startswith("reid_loss.") for k in copied)
    assert torch.equal(joint.embedding.weight, idnet.embedding.weight)


def test_transfer_refuses_a_different_architecture():
    idnet = build_idnet(NUM_CLASSES, **tiny_settings(head_dim=32))
    joint = build_joint_net(NUM_CLASSES, **tiny_settings(head_dim=64))
    with pytest.raises(PsearchError, match=r"roi_head\.fc6\.weight is \(32, "):
        transfer_idnet_weights(joint, idnet.state_dict())
    other = build_idnet(NUM_CLASSES, **tiny_settings(backbone="resnet50"))
    with pytest.raises(PsearchError, match="do not fit the joint model"):
        transfer_idnet_weights(joint, other.state_dict())
    joint_state = checkpoint_dict(joint)
    with pytest.raises(PsearchError, match="not an IDNet checkpoint"):
        transfer_idnet_weights(joint, joint_state)
