"""What the cluster-hardened component bodies do in their pod, run here without KFP.

A retried training task resumes from the checkpoint PVC (a fresh output artifact, the
same `<root>/<KFP run id>/<stage>` directory), and the dataset digest that keys the
cache of the PVC readers changes with the data and with nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train import fast_params

from components.dataset_digest import dataset_digest
from components.pretrain import pretrain
from components.runtime import checkpoint_location, params_json, tree_digest
from psearch.errors import PsearchError
from psearch.train import checkpoint as ckpt


def _artifact(path: Path) -> SimpleNamespace:
    """What KFP hands a component body: an object with the artifact's local path."""
    return SimpleNamespace(path=str(path))


@pytest.mark.slow
def test_a_retried_pretrain_task_resumes_from_the_checkpoint_pvc(
    tiny_manifests, tmp_path, monkeypatch, capsys
):
    pvc = tmp_path / "checkpoint-pvc"
    cfg = params_json(fast_params("pretrain.max_steps=4", "pretrain.checkpoint_every=1"))
    task = dict(
        manifests=_artifact(tiny_manifests),
        params_json=cfg,
        pipeline_run_id="",
        checkpoint_root=str(pvc),
        kfp_run_id="run-7",
    )
    saved = []
    real_save = ckpt.save_checkpoint

    def preempted_after_two(directory, step, state, keep=1):
        path = real_save(directory, step, state, keep)
        saved.append(step)
        if step == 2:
            raise RuntimeError("node preempted")
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", preempted_after_two)
    with pytest.raises(RuntimeError, match="preempted"):
        pretrain(**task, idnet=_artifact(tmp_path / "attempt-1" / "idnet"))
    where = pvc / "run-7" / "pretrain"
    assert ckpt.latest_checkpoint(where).name == "step-00000002.pt"
    # Nothing beside the first attempt's output: the pod's disk is lost with the pod.
    assert not ckpt.checkpoint_dir(tmp_path / "attempt-1" / "idnet").exists()

    # KFP's retry: a new pod, a new output path, the same run id and checkpoint root.
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    capsys.readouterr()
    pretrain(**task, idnet=_artifact(tmp_path / "attempt-2" / "idnet"))
    log = capsys.readouterr().out  # the summary line: run.json holds no execution facts
    assert '"resumed_from_step": 2' in log and '"steps": 4' in log
    assert not (pvc / "run-7").exists()  # a finished run's checkpoints are dropped


def test_checkpoint_location():
    assert checkpoint_location("", "run-1", "train") is None  # no checkpoint PVC
    assert checkpoint_location("/mnt/ckpt", "run-1", "train") == Path("/mnt/ckpt/run-1/train")
    with pytest.raises(PsearchError, match="without a KFP run id"):
        checkpoint_location("/mnt/ckpt", "", "train")


def test_the_dataset_digest_follows_the_data(tmp_path, capsys):
    root = tmp_path / "dataset"
    (root / "Image" / "SSM").mkdir(parents=True)
    (root / "annotation").mkdir()
    (root / "Image" / "SSM" / "s1.jpg").write_bytes(b"jpeg-1")
    (root / "annotation" / "Images.mat").write_bytes(b"mat")
    first = dataset_digest(str(root))
    assert first.startswith("sha256:") and first in capsys.readouterr().out
    assert tree_digest(root) == first  # the same data, the same key: the cache is used

    image = root / "Image" / "SSM" / "s1.jpg"
    stat = image.stat()
    image.write_bytes(b"jpeg-2")  # same size, rewritten: its modification time moves
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = tree_digest(root)
    assert changed != first
    (root / "Image" / "SSM" / "s2.jpg").write_bytes(b"x")
    added = tree_digest(root)
    assert added not in (first, changed)
    (root / "Image" / "SSM" / "s2.jpg").rename(root / "Image" / "SSM" / "s3.jpg")
    assert tree_digest(root) != added  # a renamed file is another dataset

    with pytest.raises(PsearchError, match="does not exist"):
        tree_digest(tmp_path / "absent")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(PsearchError, match="dangling: cannot read"):
        tree_digest(root)
