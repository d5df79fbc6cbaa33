"""`psearch serve` on an exported model: onnxruntime (or torch.jit) answers the query path and
ranks the gallery as the PyTorch-served model does (features within 1e-4 cosine); a bad model
file is one line and exit 2, before anything listens."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
import uvicorn
from conftest import INFERENCE_OVERRIDES
from fastapi.testclient import TestClient
from model_fixtures import he_init
from PIL import Image

from psearch.cli import main
from psearch.inference.extract import extract
from psearch.inference.index import build_index
from psearch.inference.loading import load_joint
from psearch.models.io import save_model
from psearch.serving.app import create_app
from psearch.serving.export import export_net, exported_format
from psearch.serving.service import SearchService

# Searches of the scene index: a person drawn in a gallery image, one in an uploaded image, and
# an indexed detection. Boxes are x, y, w, h (the API's form).
GALLERY_QUERY = {"image_id": 5, "box": "5,8,30,80"}
UPLOAD_BOX = "12,15,30,80"  # person 3 in scene 2


@pytest.fixture(scope="module")
def models(random_models, inference_params, tmp_path_factory) -> dict:
    """A He-initialised joint net (its features tell the scenes' people apart, unlike the stored
    init's), as a psearch model file and as its ONNX and TorchScript exports."""
    base = tmp_path_factory.mktemp("serve_export")
    net, _ = load_joint(str(random_models["joint"]), inference_params, torch.device("cpu"))
    he_init(net)
    paths = {"pytorch": save_model(base / "model.pt", net)}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts.pt")):
        export_net(net, fmt, base / name)
        paths[fmt] = base / name
    return {"base": base, **paths}


@pytest.fixture(scope="module")
def index(models, scene_manifests, index_params):
    dets = models["base"] / "dets"
    extract(scene_manifests, str(models["pytorch"]), dets, index_params)
    build_index(dets, models["base"] / "index", index_params)
    return models["base"] / "index"


@pytest.fixture(scope="module")
def services(models, index, index_params):
    served = {
        kind: SearchService(index, str(models[kind]), index_params)
        for kind in ("pytorch", "onnx", "torchscript")
    }
    yield served
    for service in served.values():
        service.stop()


def _scene_png(scene_manifests) -> bytes:
    raw = json.loads((scene_manifests / "dataset.json").read_text())["root"]
    with open(f"{raw}/Image/SSM/s2.png", "rb") as file:
        return file.read()


def _search(service, scene_manifests, how: str) -> dict:
    client = TestClient(create_app(service))
    if how == "gallery image":
        answer = client.post("/search", data={**GALLERY_QUERY, "top_k": 10})
    elif how == "upload":
        files = {"image": ("s2.png", _scene_png(scene_manifests), "image/png")}
        answer = client.post("/search", files=files, data={"box": UPLOAD_BOX, "top_k": 10})
    else:
        answer = client.post("/search", data={"detection_id": 3, "top_k": 10})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_exported_files_are_recognised(models):
    assert exported_format(models["onnx"]) == "onnx"
    assert exported_format(models["torchscript"]) == "torchscript"
    assert exported_format(models["pytorch"]) is None  # a psearch state-dict file


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
@pytest.mark.parametrize("how", ["gallery image", "upload", "detection"])
def test_exported_model_ranks_as_pytorch(services, scene_manifests, runtime, how):
    reference = _search(services["pytorch"], scene_manifests, how)
    exported = _search(services[runtime], scene_manifests, how)
    similarities = [m["similarity"] for m in reference["matches"]]
    assert len(similarities) >= 5 and np.ptp(similarities) > 0.05  # a ranking, not a tie
    assert [m["detection_id"] for m in exported["matches"]] == [
        m["detection_id"] for m in reference["matches"]
    ]
    assert np.allclose([m["similarity"] for m in exported["matches"]], similarities, atol=1e-4)
    # Both know the index was built by these weights: the export recorded their fingerprint.
    assert exported["index_matches_model"] and reference["index_matches_model"]
    assert exported["model_version"] == reference["model_version"]


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_query_features_within_1e4_cosine(services, scene_manifests, runtime):
    pixels = torch.from_numpy(
        np.asarray(Image.open(io.BytesIO(_scene_png(scene_manifests))).convert("RGB"))
    ).permute(2, 0, 1)
    for box in ([12, 15, 42, 95], [90, 20, 120, 110], [0, 0, 160, 120], [30.5, 7.25, 61, 99]):
        features = [
            service.query_feature(service.current, pixels, box)
            for service in (services["pytorch"], services[runtime])
        ]
        reference, exported = features
        assert exported.shape == reference.shape == (32,)
        cosine = float(reference @ exported / np.linalg.norm(reference) / np.linalg.norm(exported))
        assert cosine >= 1 - 1e-4, (box, cosine)


def test_version_names_the_runtime(services):
    runtimes = {kind: s.current.version()["model"]["runtime"] for kind, s in services.items()}
    assert runtimes == {"pytorch": "pytorch", "onnx": "onnxruntime", "torchscript": "torchscript"}


def _settings() -> list[str]:
    return [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]


def test_cli_serves_the_onnx_file(models, index, monkeypatch, capsys):
    """`psearch serve --model model.onnx`: says which runtime serves, and the app it hands to
    uvicorn answers searches (uvicorn.run replaced by a client of that app)."""
    answers = []

    def run(app, host, port, log_level):
        assert (host, port) == ("127.0.0.1", 8123)
        answers.append(TestClient(app).post("/search", data=GALLERY_QUERY))

    monkeypatch.setattr(uvicorn, "run", run)
    argv = ["serve", "--index", str(index), "--model", str(models["onnx"]), "--port", "8123"]
    assert main([*argv, "--reload-interval", "0", *_settings()]) == 0
    assert "(onnxruntime) on http://127.0.0.1:8123/" in capsys.readouterr().err
    assert answers[0].status_code == 200 and len(answers[0].json()["matches"]) == 7


def _foreign_onnx(path) -> None:
    """A valid ONNX graph that is not a psearch export (one input named x)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(path))


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("garbage", "not a readable onnx model"),
        ("foreign graph", "expected ['image', 'query_boxes'] (psearch export)"),
        ("missing", "model file not found"),
        ("truncated torchscript", "a damaged model file"),
    ],
)
def test_bad_model_file_is_one_line_exit_2(case, fragment, models, index, tmp_path, capsys):
    bad = tmp_path / ("model.ts.pt" if "torchscript" in case else "model.onnx")
    if case == "garbage":
        bad.write_bytes(b"\x08\x07not a protobuf at all\n" * 10)
    elif case == "foreign graph":
        _foreign_onnx(bad)
    elif case == "truncated torchscript":
        data = models["torchscript"].read_bytes()
        bad.write_bytes(data[: len(data) // 2] + data[-4096:])  # zip directory kept, data cut
    argv = ["serve", "--index", str(index), "--model", str(bad), "--port", "0"]
    assert main([*argv, "--reload-interval", "0", *_settings()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    if case != "missing":
        assert str(bad) in err
