"""Registry and promotion against a temporary SQLite MLflow store.

Models here are trivial pyfunc models (the registry does not care what a model
computes); the end-to-end `extract --model models:/...@champion` check lives in
test_registry_extract.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psearch.config import load_params
from psearch.errors import PsearchError
from psearch.registry import HISTORY_TAG, flatten_metrics, promote, register

mlflow = pytest.importorskip("mlflow")


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module; each test uses its own registered model name."""
    root = tmp_path_factory.mktemp("mlflow")
    old, telemetry = Path.cwd(), os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    os.chdir(root)  # MLflow's default artifact root is relative to the working directory
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    yield root
    os.chdir(old)
    if telemetry is None:
        os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)


@pytest.fixture
def params(store, request):
    return load_params(
        None,
        [
            f"tracking.tracking_uri=sqlite:///{store}/mlflow.db",
            "tracking.experiment=registry-tests",
            f"register.model_name=model-{request.node.name.replace('[', '-').rstrip(']')}",
        ],
    )


def metrics_tree(map100: float) -> dict:
    entry = {"mAP": map100, "top1": min(1.0, map100 + 0.1), "top5": 1.0, "top10": 1.0, "queries": 7}
    return {
        "search": {
            "gallery_50": entry,
            "gallery_100": entry,
            "occlusion": entry,
            "low_resolution": entry,
        },
        "detection": {"ap": 0.5, "recall": 0.75, "labeled_recall": 0.8},
    }


def trained(params, tmp_path: Path, map100: float, tag: str = "m") -> tuple[Path, Path, str]:
    """A training run with a logged model (run.json as `psearch train` writes it) and a metrics.json."""
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(tags={"psearch.data_version": "abc123"}) as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=[])
    model_dir = tmp_path / f"model-{tag}"
    model_dir.mkdir()
    run_json = {"run_id": run.info.run_id, "model_uri": f"runs:/{run.info.run_id}/model"}
    (model_dir / "run.json").write_text(json.dumps(run_json))
    eval_dir = tmp_path / f"eval-{tag}"
    (eval_dir / "plots").mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps(metrics_tree(map100)))
    (eval_dir / "plots" / "cmc.csv").write_text("k,top_k\n1,0.5\n")
    return model_dir, eval_dir / "metrics.json", run.info.run_id


def champion(params):
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    return str(client.get_model_version_by_alias(params.register.model_name, "champion").version)


def version_tags(params, version: str) -> dict:
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    return client.get_model_version(params.register.model_name, version).tags


def test_flatten_metrics_uses_dotted_names():
    flat = flatten_metrics(metrics_tree(0.25))
    assert flat["search.gallery_100.mAP"] == 0.25
    assert flat["search.gallery_100.queries"] == 7.0
    assert flat["detection.labeled_recall"] == 0.8


def test_register_tags_version_and_logs_evaluation_to_training_run(params, tmp_path):
    model, metrics, run_id = trained(params, tmp_path, 0.4)
    result = register(model, metrics, params)
    assert result["version"] == "1" and result["run_id"] == run_id
    tags = version_tags(params, "1")
    assert float(tags["search.gallery_100.mAP"]) == 0.4
    assert tags["psearch.train_run_id"] == run_id
    assert tags["psearch.data_version"] == "abc123"
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    train_run = client.get_run(run_id)
    assert train_run.data.metrics["search.gallery_100.mAP"] == 0.4
    assert train_run.data.metrics["detection.recall"] == 0.75
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/plots"} <= logged
    register_run = client.get_run(result["register_run_id"])
    assert register_run.data.tags["psearch.stage"] == "register"
    assert register_run.info.run_name == f"register · {params.register.model_name} v1"
    assert register_run.data.metrics["search.gallery_100.mAP"] == 0.4
    # The version's page says what it was trained on and how it scored.
    description = client.get_model_version(params.register.model_name, "1").description
    assert "data version `abc123`" in description and run_id in description
    assert "Search (gallery_100): mAP 0.400, top-1 0.500" in description
    assert "Detection: AP 0.500, recall 0.750" in description


def test_first_model_becomes_champion(params, tmp_path):
    register(*trained(params, tmp_path, 0.3)[:2], params)
    result = promote(params)
    assert result["promoted"] and result["champion_version"] is None
    assert champion(params) == "1"
    assert version_tags(params, "1")["psearch.promotion.promoted"] == "true"


@pytest.mark.parametrize("second, promoted", [(0.5, True), (0.2, False), (0.3, False)])
def test_candidate_must_strictly_beat_champion(params, tmp_path, second, promoted):
    register(*trained(params, tmp_path, 0.3, "a")[:2], params)
    promote(params)
    register(*trained(params, tmp_path, second, "b")[:2], params)
    result = promote(params)
    assert result["promoted"] is promoted
    assert champion(params) == ("2" if promoted else "1")
    tags = version_tags(params, "2")
    assert tags["psearch.promotion.champion_version"] == "1"
    assert float(tags["psearch.promotion.candidate_value"]) == second
    assert float(tags["psearch.promotion.champion_value"]) == 0.3
    assert tags["psearch.promotion.promoted"] == str(promoted).lower()


def test_force_and_explicit_version_and_other_metric(params, tmp_path):
    for tag, value in (("a", 0.5), ("b", 0.1), ("c", 0.2)):
        register(*trained(params, tmp_path, value, tag)[:2], params)
    assert promote(params, version="1")["promoted"]
    assert not promote(params)["promoted"]  # version 3 (0.2) < version 1 (0.5)
    assert promote(params, version="2", force=True)["promoted"]
    assert champion(params) == "2"
    # detection.ap is equal for all versions: not strictly greater
    assert not promote(params, version="3", metric="detection.ap")["promoted"]
    assert promote(params, version="1")["decision"].startswith("version 1 beats version 2")


def test_rollback_walks_the_champion_history(params, tmp_path):
    for tag, value in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
        register(*trained(params, tmp_path, value, tag)[:2], params)
        assert promote(params)["promoted"]
    assert champion(params) == "3"
    result = promote(params, rollback=True)
    assert (result["from_version"], result["to_version"]) == ("3", "2")
    assert champion(params) == "2"
    promote(params, rollback=True)
    assert champion(params) == "1"
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    assert json.loads(
        client.get_registered_model(params.register.model_name).tags[HISTORY_TAG]
    ) == ["1"]
    with pytest.raises(PsearchError, match="no previous champion"):
        promote(params, rollback=True)


def test_promote_errors_name_the_problem(params, tmp_path):
    with pytest.raises(PsearchError, match="no registered model"):
        promote(params)
    register(*trained(params, tmp_path, 0.3)[:2], params)
    with pytest.raises(PsearchError, match="no version 9"):
        promote(params, version="9")
    with pytest.raises(PsearchError, match="no metric tag search.nope.mAP"):
        promote(params, metric="search.nope.mAP")


def test_register_refuses_bad_inputs(params, tmp_path):
    model, metrics, _ = trained(params, tmp_path, 0.3)
    with pytest.raises(PsearchError, match="run.json"):
        register(tmp_path / "missing", metrics, params)
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(PsearchError, match="notjson.json: not valid JSON"):
        register(model, tmp_path / "notjson.json", params)
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(PsearchError, match="no search mAP"):
        register(model, tmp_path / "other.json", params)
    no_model = tmp_path / "untracked"
    no_model.mkdir()
    (no_model / "run.json").write_text(json.dumps({"run_id": None}))
    with pytest.raises(PsearchError, match="expected one model file"):
        register(no_model, metrics, params)
    (no_model / "model.pt").write_bytes(b"weights no tracked run logged")
    with pytest.raises(PsearchError, match="tracking disabled"):
        register(no_model, metrics, params)


def _psearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return subprocess.run(
        [sys.executable, "-m", "psearch", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_cli_register_promote_and_rollback(params, tmp_path, store):
    uri = ["--set", f"tracking.tracking_uri={params.tracking.tracking_uri}"]
    name = ["--set", f"register.model_name={params.register.model_name}"]
    model_a, metrics_a, _ = trained(params, tmp_path, 0.2, "a")
    model_b, metrics_b, _ = trained(params, tmp_path, 0.6, "b")
    out = tmp_path / "registry.json"
    for model, metrics in ((model_a, metrics_a), (model_b, metrics_b)):
        result = _psearch(
            "register",
            "--model",
            str(model),
            "--metrics",
            str(metrics),
            "--promote",
            "--out",
            str(out),
            *uri,
            *name,
            cwd=store,
        )
        assert result.returncode == 0, result.stderr
    assert "version 2 beats version 1" in result.stdout
    outcome = json.loads(out.read_text())
    assert outcome["version"] == "2" and outcome["promotion"]["promoted"] is True
    rollback = _psearch("promote", "--rollback", *uri, *name, cwd=store)
    assert rollback.returncode == 0, rollback.stderr
    assert "back from version 2 to version 1" in rollback.stdout
    bad = _psearch("promote", "--rollback", "--force", *uri, *name, cwd=store)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --rollback")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_tracking_server_is_a_quick_one_line_error(params, tmp_path, store):
    model, metrics, _ = trained(params, tmp_path, 0.3)
    out = tmp_path / "registry.json"
    started = time.monotonic()
    result = _psearch(
        "register",
        "--model",
        str(model),
        "--metrics",
        str(metrics),
        "--out",
        str(out),
        "--set",
        f"tracking.tracking_uri=http://127.0.0.1:{_closed_port()}",
        cwd=store,
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["pretrain", "train"])
def test_unreachable_tracking_server_stops_training_before_it_starts(
    tmp_path, tiny_manifests, command
):
    out = tmp_path / "out"
    started = time.monotonic()
    result = _psearch(
        command, "--manifests", str(tiny_manifests), "--out", str(out),
        "--set", f"tracking.tracking_uri=http://127.0.0.1:{_closed_port()}", cwd=tmp_path,
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert result.returncode == 2
    # Warnings may come first; the error is one line, last, without a traceback.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is unreachable" in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()
