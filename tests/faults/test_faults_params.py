"""Every invalid param class is a one-line error naming the key before any work starts:
non-positive sizes, batch sizes, epochs and learning rates, negative counts and lr steps."""

from __future__ import annotations

import pytest

from faults.helpers import assert_one_line_error, run_cli
from psearch.config import load_params
from psearch.errors import PsearchError

BAD = [
    ("train.lr=-0.1", "train.lr: must be greater than 0, got -0.1"),
    ("pretrain.lr=0", "pretrain.lr: must be greater than 0, got 0.0"),
    ("pretrain.batch_size=0", "pretrain.batch_size: must be greater than 0, got 0"),
    ("train.batch_size=-2", "train.batch_size: must be greater than 0, got -2"),
    ("pretrain.epochs=-1", "pretrain.epochs: must be greater than 0, got -1"),
    ("train.epochs=0", "train.epochs: must be greater than 0, got 0"),
    ("pretrain.crop_height=0", "pretrain.crop_height: must be greater than 0, got 0"),
    ("pretrain.crop_width=-48", "pretrain.crop_width: must be greater than 0, got -48"),
    ("model.min_size=0", "model.min_size: must be greater than 0, got 0"),
    ("model.max_size=-480", "model.max_size: must be greater than 0, got -480"),
    ("extract.batch_size=0", "extract.batch_size: must be greater than 0, got 0"),
    ("train.max_iters=-5", "train.max_iters: must not be negative, got -5"),
    ("pretrain.warmup_iters=-1", "pretrain.warmup_iters: must not be negative, got -1"),
    ("train.weight_decay=-0.0005", "train.weight_decay: must not be negative, got -0.0005"),
    ("train.lr_steps=[100, -1]", "train.lr_steps: every entry must not be negative, got -1"),
    ("model.anchor_sizes=[32, 0]", "model.anchor_sizes: every entry must be greater than 0"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(PsearchError) as caught:
        load_params(None, [override])
    assert str(caught.value).startswith(f"defaults: {message}")


@pytest.mark.parametrize(
    "override", ["train.max_iters=0", "train.lr_steps=[]", "train.checkpoint_every=0"]
)
def test_zero_where_zero_means_off_is_accepted(override):
    load_params(None, [override])


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--manifests", "M", "--out", "idnet"],
        ["train", "--manifests", "M", "--out", "model"],
    ],
)
@pytest.mark.parametrize("override, message", [BAD[0], BAD[2], BAD[4], BAD[6]])
def test_the_cli_refuses_them_before_reading_anything(tmp_path, capsys, argv, override, message):
    """One line, exit 2, no output: the manifests (which do not exist) are not even opened."""
    code, _, err = run_cli([*argv, "--set", override, "--set", "tracking.enabled=false"], capsys)
    assert_one_line_error(code, err, f"error: defaults: {message}")
    assert list(tmp_path.iterdir()) == []


def test_a_params_file_with_a_section_missing_keeps_that_sections_defaults(tmp_path):
    """A deliberate choice: a small file for one command is a complete params file."""
    path = tmp_path / "params.yaml"
    path.write_text("register:\n  alias: staging\n")
    params = load_params(path)
    assert params.register.alias == "staging"
    assert params.train == load_params(None).train
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(PsearchError, match=rf"^{path}: train\.lr: must be greater than 0"):
        load_params(path)
