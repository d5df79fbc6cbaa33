"""The shared layer: typed params, --set overrides, the CLI's error contract, atomic outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from psearch.atomic import atomic_dir, atomic_file
from psearch.cli import build_parser
from psearch.config import Params, flatten, load_params
from psearch.errors import PsearchError


def test_defaults_build_every_section():
    params = load_params(None, [])
    assert isinstance(params, Params)
    assert params.train.loss.reid_loss == "rss"
    assert params.train.loss.rss_k == 100
    assert params.model.feat_dim == 256
    assert params.evaluate.det_thresh == 0.5


def test_overrides_are_parsed_as_yaml_and_validated():
    params = load_params(
        None, ["train.lr=0.01", "evaluate.gallery_sizes=[50, 100]", "train.loss.rss_k=10"]
    )
    assert params.train.lr == 0.01
    assert params.evaluate.gallery_sizes == [50, 100]
    assert params.train.loss.rss_k == 10
    # an int where a float is expected is accepted and stored as a float
    assert isinstance(load_params(None, ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize("spelling, value", [("1e-4", 1e-4), ("5E-3", 5e-3), ("-2e1", -20.0)])
def test_float_without_a_dot_is_a_number(tmp_path: Path, spelling: str, value: float):
    # PyYAML reads `1e-4` as a string; `--set`, dvc -S and params.yaml must all take it.
    # (A float key without a range check: train.lr must be > 0.)
    assert (
        load_params(None, [f"train.loss.softmax_scale={spelling}"]).train.loss.softmax_scale
        == value
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"train:\n  loss:\n    softmax_scale: {spelling}\n")
    assert load_params(params_file).train.loss.softmax_scale == value
    with pytest.raises(PsearchError, match="train.epochs: expected an integer"):
        load_params(None, [f"train.epochs={spelling}"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown parameter train.lrr"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("model.backbone=alexnet", "model.backbone: 'alexnet' is not one of"),
        ("evaluate.cross_camera=maybe", "evaluate.cross_camera: expected true or false"),
        ("nosection.key=1", "unknown parameter nosection"),
        ("train=1", "expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(PsearchError) as info:
        load_params(None, [override])
    assert fragment in str(info.value)


def test_params_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(PsearchError, match=str(bad)):
        load_params(bad)
    with pytest.raises(PsearchError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad.write_text("train:\n  bogus: 1\n")
    with pytest.raises(PsearchError, match=r"params.yaml: unknown parameter train.bogus"):
        load_params(bad)


def test_flatten_uses_dotted_keys():
    flat = flatten(load_params(None, []))
    assert flat["train.loss.rss_k"] == 100
    assert flat["evaluate.det_thresh"] == 0.5


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("killed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_previous_output_whole(tmp_path: Path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_keeps_old_content_on_failure(tmp_path: Path):
    final = tmp_path / "f.json"
    final.write_text("old")
    with pytest.raises(ValueError), atomic_file(final) as tmp:
        tmp.write_text("new")
        raise ValueError
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def _psearch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "psearch", *args], capture_output=True, text=True, cwd=cwd
    )


CONTRACT_COMMANDS = [
    "synth",
    "ingest",
    "evaluate",
    "pretrain",
    "train",
    "extract",
    "extract-merge",
    "report",
    "search",
    "register",
    "promote",
    "pipeline",
]


def test_every_command_has_help():
    top = _psearch("--help")
    assert top.returncode == 0
    for command in CONTRACT_COMMANDS:
        assert command in top.stdout, command
        result = _psearch(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage: psearch" in result.stdout


def test_every_command_has_a_summary_and_a_description():
    """Each handler's docstring gives both: a summary paragraph, a blank line, the rest."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    listed = {choice.dest: choice.help for choice in subparsers._choices_actions}
    for name, parser in subparsers.choices.items():
        assert listed[name] and parser.description, name


def test_pipeline_forwards_its_arguments_and_exit_status(tmp_path: Path):
    """`psearch pipeline ACTION ARGS` runs `python -m pipelines ACTION ARGS`: options first too."""
    missing = tmp_path / "missing.yaml"
    result = _psearch("pipeline", "compile", "--params", str(missing), "--out", str(tmp_path / "p"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {missing}: params file not found"
    assert not (tmp_path / "p").exists()


def test_bad_set_is_a_one_line_error_before_any_work(tmp_path: Path):
    result = _psearch(
        "evaluate",
        "--manifests",
        str(tmp_path / "m"),
        "--detections",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "evaluate.det_thresh=high",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "evaluate.det_thresh" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_atomic_outputs_get_umask_modes_not_private_temp_modes(tmp_path: Path):
    import os

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
