"""Honest results after a kill: a run stopped mid-epoch and resumed reports the same final
metrics in run.json as an uninterrupted run (the checkpoint carries the running means), and
its checkpoints load with weights_only."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import fast_params

from psearch import stages
from psearch.train.checkpoint import checkpoint_dir, latest_checkpoint


@pytest.mark.slow
def test_a_resumed_run_reports_the_final_metrics_of_an_uninterrupted_one(tiny_manifests, tmp_path):
    def params(max_steps):
        return fast_params(
            f"pretrain.max_steps={max_steps}",
            "pretrain.checkpoint_every=3",
            "pretrain.log_every=2",
            "pretrain.batch_size=4",  # 20 steps an epoch (86 crops): the stop is mid-epoch
        )

    straight = stages.pretrain(tiny_manifests, tmp_path / "straight", params(6))
    stages.pretrain(tiny_manifests, tmp_path / "resumed", params(3))
    saved = torch.load(latest_checkpoint(checkpoint_dir(tmp_path / "resumed")), weights_only=True)
    assert len(saved["meter"]["epoch"]["loss"]) == 3
    resumed = stages.pretrain(tiny_manifests, tmp_path / "resumed", params(6), resume=True)
    assert resumed["resumed_from_step"] == 3
    finals = {k: v for k, v in straight.items() if k.startswith("final_")}
    assert finals and finals == {k: resumed[k] for k in finals}
    on_disk = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert {k: on_disk[k] for k in finals} == finals
