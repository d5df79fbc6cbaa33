"""`psearch export`: onnxruntime and TorchScript reproduce the PyTorch network on images of
several sizes (boxes within 1e-3 px, features within 1e-4 cosine, after the same NMS), and a
model from MLflow gets the export logged to its run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import INFERENCE_OVERRIDES
from model_fixtures import he_init

from psearch.cli import main
from psearch.inference.index import weights_fingerprint
from psearch.inference.loading import load_joint
from psearch.serving.export import ExportedModel, export_net

# Heights and widths unlike the trace's example (120 x 160), each side the longer once.
SIZES = [(120, 160), (100, 180), (200, 150), (90, 300)]
QUERY_BOXES = np.array([[10, 12, 40, 88], [50, 5, 84, 80]], np.float32)


@pytest.fixture(scope="module")
def net(random_models, inference_params):
    """The random joint net, He-initialised (distinct scores, so NMS has no ties to order)."""
    model, _ = load_joint(str(random_models["joint"]), inference_params, torch.device("cpu"))
    return he_init(model)


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def exported(request, net, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / f"model.{'onnx' if request.param == 'onnx' else 'pt'}"
    info = export_net(net, request.param, out)
    assert info["format"] == request.param and out.stat().st_size == info["bytes"]
    return ExportedModel(out)


def _reference(net, image: np.ndarray, boxes: np.ndarray):
    tensor = torch.from_numpy(image)
    with torch.no_grad():
        detections = net([tensor])[0]
        (query,) = net.query_features([tensor], [torch.from_numpy(boxes)])
    return (
        detections["boxes"].numpy(),
        detections["scores"].numpy(),
        detections["features"].numpy(),
        query.numpy(),
    )


@pytest.mark.parametrize("size", SIZES)
def test_exported_graph_matches_pytorch(net, exported, size):
    image = np.random.default_rng(sum(size)).random((3, *size), dtype=np.float32)
    boxes, scores, features, query = exported(image, QUERY_BOXES)
    ref_boxes, ref_scores, ref_features, ref_query = _reference(net, image, QUERY_BOXES)
    assert len(ref_boxes) > 0 and boxes.shape == ref_boxes.shape
    assert len(np.unique(ref_scores)) == len(ref_scores)  # no ties for NMS to order
    assert np.abs(boxes - ref_boxes).max() <= 1e-3
    assert np.abs(scores - ref_scores).max() <= 1e-5
    assert features.shape == ref_features.shape == (len(boxes), net.feat_dim)
    assert (1 - (features * ref_features).sum(1)).max() <= 1e-4
    assert (1 - (query * ref_query).sum(1)).max() <= 1e-4
    # Boxes beyond the trace's 120 x 160 stay: the image size is not a constant of the graph.
    assert boxes[:, 2].max() <= size[1] + 1e-3 and boxes[:, 3].max() <= size[0] + 1e-3


def test_export_records_the_source_weights(net, exported):
    assert exported.meta["fingerprint"] == weights_fingerprint(net)
    assert exported.meta["feat_dim"] == net.feat_dim


def test_no_query_boxes(exported):
    image = np.random.default_rng(1).random((3, 110, 170), dtype=np.float32)
    boxes, _, _, query = exported(image, None)
    assert query.shape[0] == 0 and len(boxes) > 0


def _settings() -> list[str]:
    return [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]


def test_cli_export_and_bad_input(random_models, tmp_path, capsys):
    out = tmp_path / "model.pt"
    argv = ["export", "--model", str(random_models["joint"]), "--format", "torchscript"]
    assert main([*argv, "--out", str(out), *_settings()]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "torchscript" and "mlflow_run" not in info and out.is_file()
    missing = tmp_path / "nope.pt"
    assert main(["export", "--model", str(missing), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}") and not (tmp_path / "x.onnx").exists()
    idnet = ["export", "--model", str(random_models["idnet"]), "--out", str(tmp_path / "x.onnx")]
    assert main([*idnet, *_settings()]) == 2
    assert "is an IDNet" in capsys.readouterr().err


def test_export_logged_to_the_model_run(random_models, tmp_path, monkeypatch, capsys):
    import mlflow

    from psearch.serving.pyfunc import log_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    # Earlier tests leave an active experiment id of another store behind: name one in this store.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_experiment("export-test")
    with mlflow.start_run() as run:
        model_uri, _ = log_model(random_models["joint"])
    out = tmp_path / "model.onnx"
    argv = ["export", "--model", model_uri, "--format", "onnx", "--out", str(out)]
    assert main([*argv, *_settings()]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mlflow_run"] == run.info.run_id and out.is_file()
    logged = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "export")]
    assert logged == ["export/model.onnx", "export/model.onnx.json"]
