"""params.yaml: the single source of settings, in step with psearch.config.Params."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from psearch.config import Params, flatten, load_params
from psearch.errors import PsearchError

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted leaf keys; `pipeline` is free-form (checked by psearch.pipeline), so only its name."""
    keys = set()
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and name != "pipeline":
            keys |= _keys(value, name)
        else:
            keys.add(name)
    return keys


def test_params_yaml_validates():
    params = load_params(PARAMS_FILE)
    assert isinstance(params, Params)


def test_params_yaml_lists_every_key_of_params():
    listed = _keys(yaml.safe_load(PARAMS_FILE.read_text()))
    expected = _keys(dataclasses.asdict(Params()))
    missing, extra = sorted(expected - listed), sorted(listed - expected)
    assert not missing, f"params.yaml lacks {missing} (add them with their defaults)"
    assert not extra, f"params.yaml has keys Params does not know: {extra}"


def test_params_yaml_values_are_the_built_in_defaults():
    # A command run outside the repository (no params.yaml) must train and load models with
    # the same settings as one run inside it.
    # (pipeline is free-form, checked by psearch.pipeline: its defaults are params.yaml's.)
    assert dataclasses.replace(load_params(PARAMS_FILE), pipeline={}) == Params()


def test_params_yaml_sections_in_params_order():
    sections = list(yaml.safe_load(PARAMS_FILE.read_text()))
    assert sections == [f.name for f in dataclasses.fields(Params)]


def test_flattened_params_are_what_mlflow_logs():
    flat = flatten(load_params(PARAMS_FILE))
    assert {"train.lr", "train.loss.reid_loss", "register.metric", "data.preset"} <= set(flat)


def _psearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "psearch", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("train:\n  lr: fast\n", "train.lr: expected a number"),
        ("train:\n  loss:\n    rss_kk: 3\n", "unknown parameter train.loss.rss_kk"),
        ("trian:\n  lr: 0.1\n", "unknown parameter trian"),
        ("model:\n  backbone: alexnet\n", "model.backbone: 'alexnet' is not one of"),
        ("train: [1, 2]\n", "train: expected a mapping"),
        ("train:\n  distill_iou: 1.5\n", "train.distill_iou: must be from 0 to 1, got 1.5"),
        ("pretrain:\n  erase: -0.1\n", "pretrain.erase: must be from 0 to 1, got -0.1"),
        (
            "model:\n  test_scale_factors: [1.0, 0]\n",
            "model.test_scale_factors: every entry must be greater than 0",
        ),
    ],
)
def test_bad_params_file_is_a_one_line_cli_error(tmp_path, content, fragment):
    bad = tmp_path / "params.yaml"
    bad.write_text(content)
    out = tmp_path / "registry.json"
    result = _psearch(
        "register", "--model", "m", "--metrics", "m.json", "--out", str(out), cwd=tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: "), result.stderr
    assert fragment in lines[0]
    assert not out.exists()


def test_unknown_override_is_rejected_before_training(tmp_path):
    out = tmp_path / "model"
    result = _psearch(
        "train",
        "--manifests",
        str(tmp_path / "m"),
        "--out",
        str(out),
        "--params",
        str(PARAMS_FILE),
        "--set",
        "train.learning_rate=0.1",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {PARAMS_FILE}: unknown parameter train.learning_rate "
        "(known: " + ", ".join(sorted(f.name for f in dataclasses.fields(Params().train))) + ")"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "section, defaults", [("pretrain", (64, 16, 0.01)), ("train", (2, 10, 3e-3))]
)
def test_shared_loop_settings_keep_each_sections_defaults_and_names(section, defaults):
    """pretrain and train declare the loop settings once (TrainLoopConfig), each its own schedule."""
    cfg = getattr(Params(), section)
    assert (cfg.batch_size, cfg.epochs, cfg.lr) == defaults
    assert (cfg.momentum, cfg.grad_clip, cfg.amp, cfg.device) == (0.9, 10.0, "bf16", "auto")
    with pytest.raises(PsearchError, match=rf": {section}\.momentum: expected a number"):
        load_params(None, [f"{section}.momentum=fast"])


def test_an_older_params_file_with_lr_step_still_loads_with_a_warning(tmp_path):
    old = tmp_path / "params.yaml"
    old.write_text("train:\n  lr_step: 1440\npretrain:\n  lr_step: 0\n")
    with pytest.warns(UserWarning, match="train.lr_step is now train.lr_steps"):
        params = load_params(old)
    assert params.train.lr_steps == [1440] and params.pretrain.lr_steps == []
