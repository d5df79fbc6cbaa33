"""The execution record that gives each `dvc repro` one MLflow parent run (psearch.tracking).

DVC is simulated by the two variables it sets for stage commands (DVC_ROOT,
DVC_STAGE); the end-to-end check under real DVC is test_dvc_pipeline.py.
"""

from __future__ import annotations

import pytest

from psearch import tracking
from psearch.config import load_params

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def dvc_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)

    def stage(name: str, fail: bool = False) -> None:
        monkeypatch.setenv("DVC_STAGE", name)
        if fail:
            with pytest.raises(RuntimeError), tracking.dvc_stage(name):
                raise RuntimeError("killed")
        else:
            with tracking.dvc_stage(name):
                pass

    return tmp_path, stage


def _record(root):
    return tracking.read_record(root / ".dvc" / "tmp" / tracking.PIPELINE_RECORD)


def test_outside_dvc_nothing_is_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    with tracking.dvc_stage("synth"):
        pass
    assert not any(tmp_path.rglob("*.json"))


def test_stages_of_one_execution_share_a_record(dvc_env):
    root, stage = dvc_env
    stage("synth")
    stage("ingest")
    first = _record(root)
    assert list(first["stages"]) == ["synth", "ingest"]
    assert all(s["end_ms"] >= s["start_ms"] for s in first["stages"].values())
    stage("synth")  # synth already finished in this execution: a new `dvc repro` began
    second = _record(root)
    assert second["execution"] != first["execution"]
    assert list(second["stages"]) == ["synth"]


def test_a_killed_stage_is_continued_by_the_next_repro(dvc_env):
    root, stage = dvc_env
    stage("synth")
    stage("train", fail=True)
    killed = _record(root)
    assert killed["stages"]["train"]["end_ms"] is None
    stage("train")
    resumed = _record(root)
    assert resumed["execution"] == killed["execution"]
    assert resumed["stages"]["train"]["end_ms"] is not None


def test_parent_run_children_and_closing(dvc_env, monkeypatch):
    root, stage = dvc_env
    params = load_params(None, [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db"])
    stage("synth")
    monkeypatch.setenv("DVC_STAGE", "train")
    with tracking.dvc_stage("train"), tracking.stage_run("train", params, seed=3) as run:
        train_id = run.info.run_id
    monkeypatch.setenv("DVC_STAGE", "register")
    with tracking.dvc_stage("register"):
        parent = tracking.finish_pipeline(params)
    assert _record(root) is None  # closed ...
    last = tracking.read_record(root / ".dvc" / "tmp" / tracking.LAST_PIPELINE_RECORD)
    assert list(tracking.stage_seconds(last)) == ["synth", "train", "register"]  # ... and kept

    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["psearch.stage"] == "pipeline"
    assert parent_run.data.params["train.lr"] == str(params.train.lr)
    assert client.get_run(train_id).data.tags["mlflow.parentRunId"] == parent
    synth = client.get_run(last["stages"]["synth"]["run_id"])
    assert synth.data.tags["mlflow.parentRunId"] == parent
    assert synth.info.start_time == last["stages"]["synth"]["start_ms"]
    assert synth.info.end_time == last["stages"]["synth"]["end_ms"]

    # The next execution gets a new parent run.
    monkeypatch.setenv("DVC_STAGE", "train")
    with tracking.dvc_stage("train"), tracking.stage_run("train", params) as run:
        assert run.data.tags["mlflow.parentRunId"] != parent


def test_explicit_parent_run_wins(dvc_env, monkeypatch):
    root, _ = dvc_env
    params = load_params(None, [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db"])
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    experiment = mlflow.set_experiment(params.tracking.experiment)
    outer = mlflow.MlflowClient().create_run(experiment.experiment_id).info.run_id
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, outer)
    monkeypatch.setenv("DVC_STAGE", "train")
    with tracking.dvc_stage("train"), tracking.stage_run("train", params) as run:
        assert run.data.tags["mlflow.parentRunId"] == outer
