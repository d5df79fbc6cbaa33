"""Model files: save/load round trips, bad files, and the MLflow log/load round trip."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from model_fixtures import NUM_CLASSES, synthetic_batch, tiny_cfg
from torchvision.io import write_png

from psearch.config import LossConfig
from psearch.errors import PsearchError
from psearch.models.idnet import IDNet, build_idnet
from psearch.models.io import load_model, log_model, save_model
from psearch.models.joint import JointNet, build_joint_net


@pytest.fixture(scope="module")
def joint() -> JointNet:
    torch.manual_seed(0)
    net = build_joint_net(tiny_cfg(), LossConfig(reid_loss="oim", oim_queue_size=8), NUM_CLASSES)
    images, targets = synthetic_batch()
    net.train()(images, targets)  # fills OIM buffers and batch-norm statistics
    return net.eval()


def assert_same_outputs(a: JointNet, b: JointNet) -> None:
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


def test_joint_round_trip_through_a_file_and_a_directory(tmp_path, joint):
    path = save_model(tmp_path / "out" / "model.pt", joint, {"epoch": 2, "data_version": "abc"})
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.pt"]
    raw = torch.load(path, weights_only=True)  # only plain types and tensors
    assert raw["format"] == "psearch-joint/1" and raw["num_classes"] == NUM_CLASSES
    assert raw["model_config"]["feat_dim"] == 32 and raw["loss_config"]["reid_loss"] == "oim"
    model, meta = load_model(path)
    assert isinstance(model, JointNet) and not model.training
    assert meta == {"epoch": 2, "data_version": "abc"}
    assert model.cfg == joint.cfg and model.loss_cfg == joint.loss_cfg
    assert torch.equal(model.reid_loss.queue, joint.reid_loss.queue)
    assert_same_outputs(joint, model)
    from_dir, _ = load_model(str(tmp_path / "out"))
    expected = joint.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in from_dir.state_dict().items())


def test_idnet_round_trip(tmp_path):
    torch.manual_seed(0)
    idnet = build_idnet(tiny_cfg(), LossConfig(), NUM_CLASSES).eval()
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
    net = build_joint_net(tiny_cfg(backbone_weights=str(weights)), LossConfig(), NUM_CLASSES)
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


def test_mlflow_log_and_load_round_trip(tmp_path, joint, monkeypatch, caplog):
    import mlflow
    import mlflow.pyfunc

    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working dir
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("models-test")
    model_file = save_model(tmp_path / "model.pt", joint, {"epoch": 4})
    with mlflow.start_run() as run:
        uri, logged_uri = log_model(model_file)
    assert uri == f"runs:/{run.info.run_id}/model"
    assert logged_uri.startswith("models:/m-")
    assert isinstance(load_model(logged_uri)[0], JointNet)

    model, meta = load_model(uri)
    assert meta == {"epoch": 4}
    assert_same_outputs(joint, model)
    # The logged model's own URI registers without MLflow's runs:/ fallback warning
    # (MLflow's loggers do not propagate: listen on them directly).
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(caplog.handler)
    try:
        version = mlflow.register_model(logged_uri, "person-search").version
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    assert "has no artifacts at artifact path" not in caplog.text
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("person-search", "champion", version)
    for registry_uri in (f"models:/person-search/{version}", "models:/person-search@champion"):
        assert isinstance(load_model(registry_uri)[0], JointNet)
    with pytest.raises(PsearchError, match="models:/no-such-model/1: cannot download"):
        load_model("models:/no-such-model/1")

    # the generic pyfunc face: detections for bare image rows, features for query rows
    images, targets = synthetic_batch()
    image_path = tmp_path / "frame.png"
    write_png((images[0] * 255).round().to(torch.uint8), str(image_path))
    box = targets[0]["boxes"][0].tolist()
    frame = pd.DataFrame(
        {
            "path": [str(image_path), str(image_path)],
            "x1": [box[0], None],
            "y1": [box[1], None],
            "x2": [box[2], None],
            "y2": [box[3], None],
        }
    )
    result = mlflow.pyfunc.load_model(uri).predict(frame)
    assert list(result.columns) == ["path", "x1", "y1", "x2", "y2", "score", "feature"]
    assert pd.isna(result["score"][0]) and len(result) > 1
    assert (result["score"][1:] >= joint.cfg.box_score_thresh).all()
    feature = torch.from_numpy(np.asarray(result["feature"][0], dtype=np.float32))
    pixels = (images[0] * 255).round() / 255  # what the PNG holds
    expected = joint.query_features([pixels], [torch.tensor([box])])[0][0]
    torch.testing.assert_close(feature, expected, atol=1e-5, rtol=1e-5)


def test_pyfunc_wrapper_of_an_idnet_answers_query_rows(tmp_path):
    from types import SimpleNamespace

    from psearch.models.pyfunc import PersonSearchModel

    torch.manual_seed(0)
    idnet = build_idnet(tiny_cfg(), LossConfig(), NUM_CLASSES).eval()
    path = save_model(tmp_path / "idnet.pt", idnet, {"crop_height": 64, "crop_width": 32})
    image = torch.zeros(3, 80, 60, dtype=torch.uint8)
    image[:, 10:70, 20:40] = 200
    write_png(image, str(tmp_path / "frame.png"))
    wrapper = PersonSearchModel()
    wrapper.load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))
    frame = pd.DataFrame({"path": [str(tmp_path / "frame.png")], "x1": [20.0], "y1": [10.0]})
    frame = frame.assign(x2=[40.0], y2=[70.0])
    result = wrapper.predict(None, frame)
    crop = image[:, 10:70, 20:40].float().div(255)
    crop = torch.nn.functional.interpolate(
        crop[None], size=(64, 32), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        expected = idnet.features(crop)[0]
    torch.testing.assert_close(torch.tensor(result["feature"][0]), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(PsearchError, match="an IDNet needs a query box"):
        wrapper.predict(None, pd.DataFrame({"path": [str(tmp_path / "frame.png")]}))
    with pytest.raises(PsearchError, match="'path' column"):
        wrapper.predict(None, pd.DataFrame({"image": ["x"]}))
