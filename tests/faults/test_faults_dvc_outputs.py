"""Results that reproduce: dvc.yaml's commands, run in order from scratch in two directories
on the tiny preset (tracking on, each directory its own MLflow store), write outputs whose every
file has the same bytes, so dvc.lock records the same output hashes for both.

The commands run in this process (psearch.cli.main, as DVC would run them from each
directory): two runs in one process share nothing but the process, and two separate
processes train the same weights (test_faults_determinism), so what differs between
executions is only what a stage writes about itself (run ids, timings, absolute paths).
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import pytest
import yaml
from dvc_repo import ROOT, TINY, deep_update

from psearch.cli import main

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# Less work than the pipeline tests' tiny settings: what differs between two executions is
# what a stage writes about itself, not how long it trains (extracting 120 images dominates).
FEWER = {
    "model": {"min_size": 96, "max_size": 128},
    "pretrain": {"max_steps": 2},
    "train": {"max_steps": 2},
}


def _outputs(stage: dict) -> list[str]:
    """The paths of a stage's outs and metrics (what dvc.lock hashes)."""
    entries = [*stage.get("outs", []), *stage.get("metrics", [])]
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


def _hashes(root: Path, output: str) -> dict[str, str]:
    path = root / output
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _run_pipeline(root: Path, monkeypatch) -> dict[str, str]:
    root.mkdir()
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    deep_update(params, FEWER)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    hashes: dict[str, str] = {}
    for name, stage in PIPELINE.items():
        argv = shlex.split(stage["cmd"])
        assert argv[0] == "psearch", name
        assert main(argv[1:]) == 0, name
        for output in _outputs(stage):
            hashes.update(_hashes(root, output))
    return hashes


@pytest.mark.slow
def test_two_pipelines_from_scratch_write_outputs_with_identical_hashes(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "PSEARCH_DATASET_ROOT", "DVC_ROOT", "DVC_STAGE"):
        monkeypatch.delenv(key, raising=False)
    first = _run_pipeline(tmp_path / "first", monkeypatch)
    second = _run_pipeline(tmp_path / "second", monkeypatch)
    assert any(path.startswith("runs/model/") for path in first)
    assert first.keys() == second.keys()
    assert [path for path in first if first[path] != second[path]] == []
    # Both registered their model in their own store: register found each training run.
    assert (tmp_path / "first" / "runs" / "registry.json").is_file()
