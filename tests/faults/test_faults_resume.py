"""Honest results after a kill: a run stopped mid-epoch and resumed reports the same final
metrics in run.json as an uninterrupted run (the checkpoint carries the running means), and
its checkpoints load with weights_only."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from test_train import FAST, fast_params, killed_after

from faults.helpers import assert_one_line_error, run_cli
from psearch import stages
from psearch.train.checkpoint import checkpoint_dir, discard, latest_checkpoint


@pytest.mark.slow
def test_a_resumed_run_reports_the_final_metrics_of_an_uninterrupted_one(
    tiny_manifests, tmp_path, monkeypatch
):
    def params(max_steps):
        return fast_params(
            f"pretrain.max_steps={max_steps}",
            "pretrain.checkpoint_every=3",
            "pretrain.log_every=2",
            "pretrain.batch_size=4",  # 20 steps an epoch (86 crops): the stop is mid-epoch
        )

    straight = stages.pretrain(tiny_manifests, tmp_path / "straight", params(6))
    revive = killed_after(monkeypatch, "pretrain", 4)  # killed in step 5, after checkpoint 3
    with pytest.raises(KeyboardInterrupt):
        stages.pretrain(tiny_manifests, tmp_path / "resumed", params(6))
    revive()
    saved = torch.load(latest_checkpoint(checkpoint_dir(tmp_path / "resumed")), weights_only=True)
    assert len(saved["meter"]["epoch"]["loss"]) == 3
    resumed = stages.pretrain(tiny_manifests, tmp_path / "resumed", params(6), resume=True)
    assert resumed["resumed_from_step"] == 3
    finals = {k: v for k, v in straight.items() if k.startswith("final_")}
    assert finals and finals == {k: resumed[k] for k in finals}
    on_disk = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert {k: on_disk[k] for k in finals} == finals


@pytest.mark.slow
@pytest.mark.parametrize("failing_save", [1, 2])
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(
    tiny_manifests, tmp_path, capsys, monkeypatch, failing_save
):
    """ENOSPC while writing checkpoint N: one line naming the file, exit 2, no output; the
    checkpoint before it intact and loadable (none, and no empty directory, for the first)."""
    real_save, calls = torch.save, {"n": 0}

    def disk_fills_up(obj, f, *args, **kwargs):
        if str(f).endswith(".pt") or ".pt.tmp-" in str(f):
            calls["n"] += 1
            if calls["n"] == failing_save:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "idnet"
    overrides = [
        *FAST,
        "pretrain.max_steps=4",
        "pretrain.checkpoint_every=2",
        "tracking.enabled=false",
    ]
    argv = ["pretrain", "--manifests", str(tiny_manifests), "--out", str(out)]
    code, _, err = run_cli([*argv, *(a for o in overrides for a in ("--set", o))], capsys)
    name = f"step-0000000{2 * failing_save}.pt: No space left on device"
    assert_one_line_error(code, err, f"{checkpoint_dir(out)}/{name}")
    assert not out.exists()
    kept = checkpoint_dir(out)
    if failing_save == 1:
        assert not kept.exists()
    else:
        assert [p.name for p in kept.iterdir()] == ["step-00000002.pt"]
        assert torch.load(kept / "step-00000002.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_a_finished_training_discards_its_checkpoints_so_a_rerun_is_from_scratch(
    tiny_manifests, tmp_path, monkeypatch
):
    """`dvc repro --force` runs the stage's command (with --resume) again after a finished
    run: it must train from scratch, and end with the same bytes."""
    params = fast_params("pretrain.max_steps=3", "pretrain.checkpoint_every=2")
    out = tmp_path / "idnet"
    revive = killed_after(monkeypatch, "pretrain", 2)
    with pytest.raises(KeyboardInterrupt):
        stages.pretrain(tiny_manifests, out, params, resume=True)
    revive()
    assert latest_checkpoint(checkpoint_dir(out)).name == "step-00000002.pt"
    assert stages.pretrain(tiny_manifests, out, params, resume=True)["resumed_from_step"] == 2
    assert not checkpoint_dir(out).exists()
    resumed = (out / "idnet.pt").read_bytes()
    again = stages.pretrain(tiny_manifests, out, params, resume=True)
    assert again["resumed_from_step"] == 0 and again["steps"] == 3
    assert (out / "idnet.pt").read_bytes() == resumed
    assert not checkpoint_dir(out).exists()


def test_discarding_checkpoints_leaves_other_files(tmp_path):
    """A checkpoint directory that holds anything else (a shared volume) keeps it."""
    where = tmp_path / "model.ckpt"
    where.mkdir()
    for name in ("step-00000004.pt", ".step-00000006.pt.tmp-12-host-ab", "notes.txt"):
        (where / name).write_text("x")
    discard(where)
    assert [p.name for p in where.iterdir()] == ["notes.txt"]
    (where / "notes.txt").unlink()
    (where / "step-00000008.pt").write_text("x")
    discard(where)
    assert not where.exists()
    discard(where)  # nothing there: nothing to do
