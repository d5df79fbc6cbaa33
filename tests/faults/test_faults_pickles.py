"""Nothing executes from a data file: a code-running pickle planted where psearch reads a torch
file (a model for extract, an IDNet for train --init, a checkpoint for --resume) is refused
and its payload never runs."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from faults.helpers import RunsCode, assert_one_line_error, plant_pickle, run_cli
from psearch.train.checkpoint import checkpoint_dir

NO_TRACKING = ["--set", "tracking.enabled=false"]
# A one-step joint training at a small resolution: enough to see where it started from.
ONE_STEP = [
    "model.min_size=96",
    "model.max_size=128",
    "model.rpn_pre_nms_top_n_train=300",
    "model.rpn_post_nms_top_n_train=64",
    "model.roi_batch_size_per_image=64",
    "model.feat_dim=32",
    "model.head_dim=64",
    "train.num_workers=0",
    "train.max_steps=1",
    "train.loss.reid_loss=oim",
    "tracking.enabled=false",
]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for value in overrides for arg in ("--set", value)]


def test_the_planted_pickle_runs_code_when_loaded_unsafely(tmp_path, marker):
    """The payload works: loading it the unsafe way creates the marker (so the other tests'
    'never ran' means refused, not harmless)."""
    path = plant_pickle(tmp_path / "model.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_planted_model_file_is_refused(tiny_manifests, tmp_path, marker, capsys):
    model = plant_pickle(tmp_path / "model.pt", marker)
    out = tmp_path / "dets"
    argv = ["extract", "--manifests", str(tiny_manifests), "--model", str(model)]
    code, _, err = run_cli([*argv, "--out", str(out), *NO_TRACKING], capsys)
    line = assert_one_line_error(code, err, "model.pt", "refused", "io.open")
    assert "weights_only" not in line
    assert not marker.exists() and not out.exists()


def test_a_planted_init_file_is_refused(tiny_manifests, tmp_path, marker, capsys):
    idnet = plant_pickle(tmp_path / "idnet.pt", marker)
    out = tmp_path / "model"
    argv = ["train", "--manifests", str(tiny_manifests), "--init", str(idnet)]
    code, _, err = run_cli([*argv, "--out", str(out), *_sets(ONE_STEP)], capsys)
    assert_one_line_error(code, err, "idnet.pt", "refused")
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_a_planted_checkpoint_is_refused_and_training_starts_fresh(
    tiny_manifests, tmp_path, marker, capsys
):
    out = tmp_path / "model"
    planted = plant_pickle(checkpoint_dir(out) / "step-00000005.pt", marker, step=5)
    argv = ["train", "--manifests", str(tiny_manifests), "--out", str(out), "--resume"]
    with pytest.warns(UserWarning, match="step-00000005.pt: refused to load this checkpoint"):
        code, stdout, err = run_cli(
            [*argv, *_sets([*ONE_STEP, "train.checkpoint_every=1"])], capsys
        )
    assert code == 0, err
    assert not marker.exists()
    info = json.loads(stdout)
    assert info["resumed_from_step"] == 0 and info["steps"] == 1
    assert (out / "model.pt").is_file()
    # The run's own checkpoint replaced the planted one, and the finished run discarded it.
    assert not planted.exists() and not checkpoint_dir(out).exists()


def test_an_unreadable_model_names_no_unsafe_workaround(tiny_manifests, tmp_path, capsys):
    model = tmp_path / "model.pt"
    model.write_bytes(b"\x80\x02 not a torch file" * 20)
    argv = ["extract", "--manifests", str(tiny_manifests), "--model", str(model)]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "dets"), *NO_TRACKING], capsys)
    line = assert_one_line_error(code, err, "model.pt", "not a readable psearch model file")
    assert "weights_only" not in line and "arbitrary code" not in line


def test_a_planted_registry_artifact_is_refused(tiny_manifests, tmp_path, marker, capsys):
    """A downloaded MLflow model directory (what `--model runs:/...` or `models:/...` fetches):
    psearch reads only its artifacts/model.pt, with weights_only. It never runs the pyfunc's
    code file (pyfunc_model.py: psearch logs its pyfunc as MLflow "models from code") nor
    unpickles a python_model.pkl (what MLflow writes for a pickled python_model, as a
    hostile or older artifact may hold); all three are planted here."""
    model_dir = tmp_path / "downloaded" / "model"
    (model_dir / "MLmodel").parent.mkdir(parents=True)
    (model_dir / "MLmodel").write_text(
        "flavors:\n  python_function:\n    model_code_path: pyfunc_model.py\n"
    )
    (model_dir / "pyfunc_model.py").write_text(f"open({str(marker)!r}, 'w')\n")
    with open(model_dir / "python_model.pkl", "wb") as handle:
        pickle.dump(RunsCode(marker), handle)
    plant_pickle(model_dir / "artifacts" / "model.pt", marker)
    out = tmp_path / "dets"
    argv = ["extract", "--manifests", str(tiny_manifests), "--model", str(model_dir)]
    code, _, err = run_cli([*argv, "--out", str(out), *NO_TRACKING], capsys)
    assert_one_line_error(code, err, "artifacts/model.pt", "refused", "io.open")
    assert not marker.exists() and not out.exists()
