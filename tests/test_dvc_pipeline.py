"""The whole DVC pipeline on the tiny preset, in a throw-away git repo.

One `dvc repro` is killed while `train` runs; the second resumes after the last
finished stage and completes the execution. Then: the outputs, the metrics and
plots DVC shows, the MLflow parent/child runs of that execution, the registry,
the demo summary with its random-feature baseline, and an up-to-date re-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc_repo import ROOT, TINY, env, make_repo, run
from servers import BIN

pytestmark = pytest.mark.slow

STAGES = ["synth", "ingest", "pretrain", "train", "extract", "evaluate", "register"]
DVC = str(BIN / "dvc")
PLOTS = {  # dvc.yaml's top-level plots: id -> (x, y)
    "cmc": ("k", "top_k"),
    "gallery_size": ("gallery_size", "mAP"),
    "detection_pr": ("recall", "precision"),
}


def _kill_when_train_starts(repo: Path, environ: dict[str, str]) -> str:
    """Run `dvc repro` and SIGKILL it (its whole process group) once the train stage began."""
    record = repo / ".dvc" / "tmp" / "psearch-pipeline.json"
    log = repo.parent / "first-repro.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [DVC, "repro"], cwd=repo, env=environ, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if record.is_file() and '"train"' in record.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"dvc repro ended before train started:\n{log.read_text()}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def test_dvc_repro_killed_then_resumed_runs_whole_pipeline(tmp_path):
    repo = make_repo(tmp_path / "repo", STAGES, TINY)
    environ = env()

    first = _kill_when_train_starts(repo, environ)
    assert "Running stage 'pretrain'" in first
    assert not (repo / "runs" / "model").exists(), "a killed stage left a partial output"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"synth", "ingest", "pretrain"} <= set(lock) and "train" not in lock

    second = run([DVC, "repro"], repo, environ).stdout
    for stage in ("synth", "ingest", "pretrain"):
        assert f"Stage '{stage}' didn't change, skipping" in second
    for stage in ("train", "extract", "evaluate", "register"):
        assert f"Running stage '{stage}'" in second
    assert "no champion yet: version 1 becomes the champion" in second

    metrics = json.loads((repo / "runs/eval/metrics.json").read_text())
    assert {"gallery_50", "gallery_100", "occlusion", "low_resolution"} <= set(metrics["search"])
    registry = json.loads((repo / "runs/registry.json").read_text())
    assert registry["version"] == "1" and registry["promotion"]["promoted"] is True

    _check_mlflow_runs(repo, registry)
    _check_dvc_views(repo, environ)

    summary = run(
        [sys.executable, str(ROOT / "scripts/demo_summary.py"), "--root", str(repo)], repo, environ
    ).stdout
    assert "random unit features on the same detections" in summary
    assert "stage times (s)" in summary and "train" in summary

    third = run([DVC, "repro"], repo, environ).stdout
    assert "Running stage" not in third  # up to date: nothing re-runs, nothing re-registers


def _check_mlflow_runs(repo: Path, registry: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("person-search")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("psearch.stage") == "pipeline"]
    assert len(parents) == 1, "the killed and the resumed `dvc repro` are one execution"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["psearch.data_version"].startswith("sha256:")
    assert parent.data.tags["psearch.git_revision"] not in ("", "unknown")
    assert parent.data.params["data.preset"] == "tiny"
    assert "search.gallery_50.mAP" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = {r.data.tags["psearch.stage"] for r in children if r.info.status == "FINISHED"}
    assert finished == set(STAGES)
    train = client.get_run(registry["run_id"])
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "search.gallery_100.mAP" in train.data.metrics
    assert {a.path for a in client.list_artifacts(train.info.run_id, "evaluation")} >= {
        "evaluation/metrics.json",
        "evaluation/plots",
    }
    version = client.get_model_version_by_alias("person-search", "champion")
    assert str(version.version) == "1"


def _check_dvc_views(repo: Path, environ: dict[str, str]) -> None:
    shown = json.loads(run([DVC, "metrics", "show", "--json"], repo, environ).stdout)
    data = shown[""]["data"]["runs/eval/metrics.json"]["data"]
    assert "mAP" in data["search"]["gallery_50"]
    plots = json.loads(run([DVC, "plots", "show", "--json"], repo, environ).stdout)["data"]
    for name, (x, y) in PLOTS.items():
        rendered = plots[name][0]
        assert rendered["type"] == "vega"
        content = json.dumps(rendered["content"])
        assert f'"field": "{x}"' in content and f'"field": "{y}"' in content
        assert rendered["content"]["data"]["values"], f"{name}: no points"
    status = run([DVC, "status"], repo, environ).stdout
    assert "up to date" in status
