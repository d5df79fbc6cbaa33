"""The MLflow face of a model file: log_model, fetching by MLflow URI, the pyfunc's predict."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from model_fixtures import (
    NUM_CLASSES,
    assert_same_outputs,
    synthetic_batch,
    tiny_settings,
    trained_joint,
)
from torchvision.io import write_png

from psearch.errors import PsearchError
from psearch.imaging import cut_crops
from psearch.inference.loading import fetch_model
from psearch.models.idnet import build_idnet
from psearch.models.io import save_model
from psearch.models.joint import JointNet
from psearch.serving.pyfunc import (
    MODEL_CODE,
    SIGNATURE,
    PersonSearchModel,
    example_input,
    log_model,
)


@pytest.fixture(scope="module")
def joint() -> JointNet:
    return trained_joint()


def test_mlflow_log_and_load_round_trip(tmp_path, joint, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working dir
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("models-test")
    # the generic pyfunc face: detections for bare image rows, features for query rows;
    # the same frame is the logged model's input example
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
    model_file = save_model(tmp_path / "model.pt", joint, {"epoch": 4})
    with mlflow.start_run() as run:
        uri, logged_uri = log_model(model_file, example=frame)
    assert uri == f"runs:/{run.info.run_id}/model"
    assert logged_uri.startswith("models:/m-")
    # What the UI shows on the model's page: the table in and out, and the example.
    info = mlflow.models.get_model_info(logged_uri)
    assert info.signature == SIGNATURE
    assert not info.signature.inputs.input_dict()["x1"].required
    assert info.saved_input_example_info["type"] == "dataframe"
    example = mlflow.models.Model.load(logged_uri).load_input_example(
        mlflow.artifacts.download_artifacts(logged_uri)
    )
    assert list(example["path"]) == [str(image_path)] * 2
    assert isinstance(fetch_model(logged_uri)[0], JointNet)

    model, meta = fetch_model(uri)
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
        assert isinstance(fetch_model(registry_uri)[0], JointNet)
    with pytest.raises(PsearchError, match="models:/no-such-model/1: cannot download"):
        fetch_model("models:/no-such-model/1")

    result = mlflow.pyfunc.load_model(uri).predict(frame)
    assert list(result.columns) == ["path", "x1", "y1", "x2", "y2", "score", "feature"]
    assert pd.isna(result["score"][0]) and len(result) > 1
    assert (result["score"][1:] >= joint.box_score_thresh).all()
    feature = torch.from_numpy(np.asarray(result["feature"][0], dtype=np.float32))
    pixels = (images[0] * 255).round() / 255  # what the PNG holds
    expected = joint.query_features([pixels], [torch.tensor([box])])[0][0]
    torch.testing.assert_close(feature, expected, atol=1e-5, rtol=1e-5)


def test_the_input_example_is_a_test_image_whole_and_with_a_box(
    tiny_manifests, tmp_path, monkeypatch
):
    whole = example_input(tiny_manifests)
    assert list(whole.columns) == ["path", "x1", "y1", "x2", "y2"] and len(whole) == 2
    assert whole["x1"].isna()[0] and not whole.iloc[1].isna().any()
    assert whole["path"][0] == whole["path"][1] and os.path.isfile(whole["path"][0])
    crop_only = example_input(tiny_manifests, whole_image=False)  # an IDNet answers boxes only
    assert crop_only.iloc[0].equals(whole.iloc[1])
    monkeypatch.setenv("PSEARCH_DATASET_ROOT", str(tmp_path))  # the images are not there
    assert example_input(tiny_manifests) is None


def test_log_model_needs_a_file_and_an_active_run(tmp_path, joint):
    with pytest.raises(PsearchError, match="model file not found"):
        log_model(tmp_path / "nope.pt")
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_model(save_model(tmp_path / "model.pt", joint))


def _responsive_idnet():
    """A small IDNet whose batch-norm statistics come from data (random init with unit
    statistics gives nearly the same feature for any input, which would prove nothing)."""
    torch.manual_seed(0)
    idnet = build_idnet(NUM_CLASSES, context=1.5, **tiny_settings())
    for module in idnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        idnet.train().features(torch.rand(8, 3, 96, 48, generator=torch.Generator().manual_seed(1)))
    return idnet.eval()


def test_pyfunc_wrapper_of_an_idnet_answers_query_rows(tmp_path):
    idnet = _responsive_idnet()
    path = save_model(tmp_path / "idnet.pt", idnet, {"crop_height": 64, "crop_width": 32})
    image = torch.zeros(3, 80, 60, dtype=torch.uint8)
    image[:, 10:70, 20:40] = 200
    write_png(image, str(tmp_path / "frame.png"))
    wrapper = PersonSearchModel()
    wrapper.load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))
    frame = pd.DataFrame({"path": [str(tmp_path / "frame.png")], "x1": [20.0], "y1": [10.0]})
    frame = frame.assign(x2=[40.0], y2=[70.0])
    result = wrapper.predict(None, frame)
    # The crop is cut from the image's pixels as extraction and pretraining cut theirs.
    box = [[20.0, 10.0, 40.0, 70.0]]
    with torch.no_grad():
        expected = idnet.features(cut_crops(image, box, (64, 32), 1.5))[0]
        darker = idnet.features(cut_crops(image // 2, box, (64, 32), 1.5))[0]
    got = torch.tensor(result["feature"][0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, darker, atol=1e-3)  # the features do follow the pixels
    with pytest.raises(PsearchError, match="an IDNet needs a query box"):
        wrapper.predict(None, pd.DataFrame({"path": [str(tmp_path / "frame.png")]}))
    with pytest.raises(PsearchError, match="'path' column"):
        wrapper.predict(None, pd.DataFrame({"image": ["x"]}))


def test_the_logged_pyfunc_is_code_not_a_pickle(tmp_path, monkeypatch):
    """The pyfunc is logged as MLflow "models from code": its artifacts hold the code file
    and the checkpoint, no pickled object, and it loads and predicts with MLflow's pickle
    deserialisation switched off (which refuses a cloudpickled python_model)."""
    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working dir
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("models-from-code")
    idnet = _responsive_idnet()
    path = save_model(tmp_path / "idnet.pt", idnet, {"crop_height": 64, "crop_width": 32})
    image = torch.zeros(3, 80, 60, dtype=torch.uint8)
    image[:, 10:70, 20:40] = 200
    write_png(image, str(tmp_path / "frame.png"))
    frame = pd.DataFrame({"path": [str(tmp_path / "frame.png")], "x1": [20.0], "y1": [10.0]})
    frame = frame.assign(x2=[40.0], y2=[70.0])
    with mlflow.start_run():
        uri, logged_uri = log_model(path, example=frame)
    local = Path(mlflow.artifacts.download_artifacts(logged_uri, dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert {"MLmodel", "pyfunc_model.py", "artifacts/idnet.pt"} <= files
    flavor = mlflow.models.Model.load(local).flavors["python_function"]
    assert Path(flavor["model_code_path"]).name == "pyfunc_model.py"
    assert "python_model" not in flavor  # where MLflow names a pickled python_model
    # The code file is the package's own (SECURITY.md tells consumers to compare them), and
    # the environment installs psearch, whose class it names.
    assert (local / "pyfunc_model.py").read_bytes() == MODEL_CODE.read_bytes()
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("psearch") for line in requirements)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with torch.no_grad():
        expected = idnet.features(cut_crops(image, [[20.0, 10.0, 40.0, 70.0]], (64, 32), 1.5))[0]
    for model_uri in (uri, logged_uri):
        result = mlflow.pyfunc.load_model(model_uri).predict(frame)
        got = torch.tensor(result["feature"][0])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
