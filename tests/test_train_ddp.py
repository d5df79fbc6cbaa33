"""Two-process DistributedDataParallel training on CPU (gloo) through `torchrun`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_train import FAST

from psearch.digest import file_sha256
from psearch.tracking import MODEL_SHA256_TAG


@pytest.mark.slow
def test_torchrun_two_processes_train_one_model_and_one_run(tiny_manifests, tmp_path):
    import mlflow

    out = tmp_path / "model"
    overrides = [
        *FAST,
        "train.max_steps=3",
        "train.loss.reid_loss=oim",  # exercises the all-gather that keeps OIM tables equal
        "train.loss.oim_queue_size=32",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "psearch.cli",
        "train",
        "--manifests",
        str(tiny_manifests),
        "--out",
        str(out),
    ]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas disagree" not in done.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["steps"] == 3 and "images_per_s" not in info  # timings go to MLflow only
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # only rank 0 tracks
    assert runs[0].data.tags["psearch.world_size"] == "2"
    # run.json holds no run id (DVC output hashes stay reproducible): the run names the model.
    assert runs[0].data.tags[MODEL_SHA256_TAG] == file_sha256(out / "model.pt")
