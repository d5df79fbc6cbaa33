"""What a user sees of psearch's runs in the MLflow UI: the experiment's kind, run names,
the manifests as a dataset input, per-stage metric keys and system metrics."""

from __future__ import annotations

import time

import pytest

from psearch.config import load_params
from psearch.tracking import ParentRun, stage_metrics, stage_run
from psearch.tracking.datasets import short_digest
from psearch.tracking.mlflow_runs import (
    EXPERIMENT_KIND_TAG,
    TRAINING_EXPERIMENT_KIND,
    data_version,
)
from psearch.tracking.names import parent_run_name, stage_run_name

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to it
    monkeypatch.delenv("PSEARCH_PARENT_RUN_ID", raising=False)
    return load_params(
        None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=ui"]
    )


def test_run_names_say_stage_loss_backbone_and_data():
    params = load_params(None, ["train.loss.reid_loss=oim", "model.backbone=resnet50"])
    version = "sha256:3f2a9c0011"
    assert stage_run_name("train", params, version) == "train · oim · resnet50 · 3f2a9c"
    # IDNet trains with train.loss unless the recipe gives it its own (the paper: softmax).
    assert stage_run_name("pretrain", params, version) == "pretrain · oim · resnet50 · 3f2a9c"
    paper = load_params(None, ["pretrain.loss={reid_loss: softmax}", "model.backbone=vgg16"])
    assert stage_run_name("pretrain", paper, version) == "pretrain · softmax · vgg16 · 3f2a9c"
    assert stage_run_name("extract", params, version, "gt+idnet") == "extract · gt+idnet · 3f2a9c"
    assert stage_run_name("evaluate", params, "unknown") == "evaluate"
    assert parent_run_name("kubeflow", "person-search-x") == "kubeflow · person-search-x"
    assert parent_run_name("dvc", start_ms=0) == "dvc · 1970-01-01 00:00 UTC"
    assert short_digest("sha256:abcdef0123456789") == "abcdef012345"
    assert stage_metrics("pretrain", {"acc_reid": 0.5}) == {"pretrain/acc_reid": 0.5}


def test_a_stage_run_is_named_logs_its_dataset_and_samples_the_machine(
    params, tiny_manifests, monkeypatch
):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with stage_run("extract", params, tiny_manifests, split="test", system_metrics=True) as run:
        time.sleep(1.0)  # a few samples
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("ui")
    # The UI opens it as model training (its runs table), not as a GenAI experiment.
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    done = client.get_run(run.info.run_id)
    version = data_version(tiny_manifests)
    assert done.info.run_name == f"extract · {version.split(':')[1][:6]}"
    (dataset,) = done.inputs.dataset_inputs
    assert dataset.dataset.name == "CUHK-SYSU"
    assert dataset.dataset.digest == short_digest(version)
    assert '"uri"' in dataset.dataset.source and "tiny_dataset" in dataset.dataset.source
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "test"
    system = [key for key in done.data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    assert "system/system_memory_usage_megabytes" in system


def test_system_metrics_follow_mlflows_switch(params, tiny_manifests, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with stage_run("train", params, tiny_manifests, split="train", system_metrics=True) as run:
        time.sleep(0.6)
    metrics = mlflow.MlflowClient(params.tracking.tracking_uri).get_run(run.info.run_id).data
    assert not [key for key in metrics.metrics if key.startswith("system/")]


def test_an_experiment_the_ui_guessed_as_genai_is_set_back_to_training(params):
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    experiment_id = client.create_experiment("ui")
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development_inferred")
    parent = ParentRun.create(params, "cli")
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == (
        TRAINING_EXPERIMENT_KIND
    )
    assert client.get_run(parent.run_id).info.run_name.startswith("cli · ")
