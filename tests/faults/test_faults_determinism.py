"""Results that reproduce: two short trainings from scratch on the tiny preset, in separate
processes, give bitwise-identical weights (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import FAST

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_two_trainings_from_scratch_in_separate_processes_are_bitwise_identical(
    tiny_manifests, tmp_path
):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    overrides = [*FAST, "pretrain.max_steps=3", "pretrain.device=cpu", "tracking.enabled=false"]
    sets = [arg for value in overrides for arg in ("--set", value)]
    for name in ("first", "second"):
        argv = ["pretrain", "--manifests", str(tiny_manifests), "--out", name, *sets]
        done = subprocess.run(
            [sys.executable, "-m", "psearch", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    first, second = (
        torch.load(tmp_path / name / "idnet.pt", weights_only=True)["state_dict"]
        for name in ("first", "second")
    )
    assert first.keys() == second.keys() and len(first) > 0
    for key in first:
        assert torch.equal(first[key], second[key]), key
