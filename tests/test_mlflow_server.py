"""The stages against a real `mlflow server` (SQLite backend, artifacts in moto's S3).

The client side has no AWS credentials at all: the server proxies artifacts to
S3 (`--artifacts-destination`), as a real deployment would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from dvc_repo import ROOT, TINY, deep_update, env, run
from servers import BIN, mlflow_server, moto_s3, s3_keys  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_stages_track_to_server_with_s3_artifacts(tmp_path: Path, mlflow_server, moto_s3):  # noqa: F811
    import mlflow

    uri = mlflow_server["uri"]
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("server-test")
    parent = client.create_run(experiment, run_name="pipeline").info.run_id
    environ = env(MLFLOW_TRACKING_URI=uri, PSEARCH_PARENT_RUN_ID=parent)
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["tracking"]["experiment"] = "server-test"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    psearch = str(BIN / "psearch")

    def stage(*args: str) -> str:
        return run([psearch, *args], tmp_path, environ).stdout

    stage("synth", "--out", "raw")
    stage("ingest", "--root", "raw", "--out", "manifests")
    stage("pretrain", "--manifests", "manifests", "--out", "idnet")
    stage("train", "--manifests", "manifests", "--init", "idnet/idnet.pt", "--out", "model")
    stage("extract", "--manifests", "manifests", "--model", "model", "--out", "dets")
    stage("evaluate", "--manifests", "manifests", "--detections", "dets", "--out", "eval")
    out = stage(
        "register", "--model", "model", "--metrics", "eval/metrics.json", "--promote",
        "--out", "registry.json",
    )  # fmt: skip
    assert "no champion yet: version 1 becomes the champion" in out

    # The champion alias resolves through the server (and its S3 artifacts) for extraction.
    stage(
        "extract", "--manifests", "manifests", "--model", "models:/person-search@champion",
        "--out", "dets_champion",
    )  # fmt: skip
    for name in ("gallery_detections.parquet", "query_features.parquet"):
        assert pq.read_table(tmp_path / "dets_champion" / name).equals(
            pq.read_table(tmp_path / "dets" / name)
        ), name

    train_run = json.loads((tmp_path / "registry.json").read_text())["run_id"]  # found by hash
    runs = client.search_runs([experiment])
    stages = {
        r.data.tags.get("psearch.stage")
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent
    }
    assert {"pretrain", "train", "register"} <= stages
    trained = client.get_run(train_run)
    assert trained.data.tags["psearch.data_version"].startswith("sha256:")
    assert "search.gallery_50.mAP" in trained.data.metrics
    assert trained.info.artifact_uri.startswith("mlflow-artifacts:")
    keys = s3_keys(moto_s3["client"], "psearch-mlflow", "artifacts/")
    assert any(key.endswith("evaluation/metrics.json") for key in keys)
    assert any("model" in key and key.endswith(".pt") for key in keys), keys[:20]
