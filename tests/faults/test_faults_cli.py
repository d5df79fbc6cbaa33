"""The CLI boundary: every failure is one line `error: ...`. An OSError (an output path that
cannot be a directory, a full disk) names the path and exits 2 with nothing written; an
unexpected exception is an "internal error" that asks for --debug and exits 1."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from eval_reference import fake_detections

from faults.helpers import assert_one_line_error, run_cli
from psearch.cli import build_parser, common
from psearch.data.manifest import read_manifests, write_parquet

SRC = Path(__file__).resolve().parents[2] / "src"


def _psearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "psearch", *args, "--set", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def blocked(tmp_path) -> Path:
    """An output location under a plain file: no directory can be made there (as root too,
    where permission bits would not stop anything)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    return blocker / "out"


@pytest.fixture(scope="module")
def detections(tiny_manifests, tmp_path_factory) -> Path:
    m = read_manifests(tiny_manifests)
    dets, qfeats = fake_detections(m.images, m.boxes, m.queries, np.random.default_rng(0))
    directory = tmp_path_factory.mktemp("dets")
    write_parquet(dets, directory / "gallery_detections.parquet")
    write_parquet(qfeats, directory / "query_features.parquet")
    (directory / "extraction.json").write_text('{"model": "test"}')
    return directory


def test_synth_into_an_impossible_directory(tmp_path, blocked):
    result = _psearch("synth", "--preset", "tiny", "--out", str(blocked), cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, "blocker")
    assert _files(tmp_path) == {"blocker"}


def test_evaluate_into_an_impossible_directory(tiny_manifests, detections, tmp_path, blocked):
    argv = ["evaluate", "--manifests", str(tiny_manifests), "--detections", str(detections)]
    result = _psearch(*argv, "--out", str(blocked), "--no-plots", cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, "blocker")
    assert "Traceback" not in result.stderr
    assert _files(tmp_path) == {"blocker"}


def test_a_full_disk_names_the_file(tiny_manifests, detections, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing metrics.json: one line naming the file, exit 2, no output."""
    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith("metrics"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "eval"
    argv = ["evaluate", "--manifests", str(tiny_manifests), "--detections", str(detections)]
    code, _, err = run_cli([*argv, "--out", str(out), "--no-plots"], capsys)
    assert_one_line_error(code, err, f"{out}/metrics.json: No space left on device")
    assert not out.exists()


def test_an_unexpected_exception_is_an_internal_error(tmp_path, capsys):
    def broken(args):
        raise ValueError("something\nthat spans lines")

    args = build_parser().parse_args(["synth", "--out", str(tmp_path / "data")])
    args.func = broken
    code = common.run_handler(args)
    err = capsys.readouterr().err
    line = assert_one_line_error(code, err, exit_code=1)
    assert line == (
        "error: internal error (ValueError: something that spans lines); "
        "re-run with --debug for the traceback"
    )
    args.debug = True
    with pytest.raises(ValueError):
        common.run_handler(args)


def test_train_refuses_an_impossible_output_before_training(
    tiny_manifests, tmp_path, blocked, capsys
):
    """The output is checked before the first step (it used to fail after the whole run)."""
    argv = ["train", "--manifests", str(tiny_manifests), "--out", str(blocked)]
    overrides = ["train.max_steps=1", "train.num_workers=0", "tracking.enabled=false"]
    code, _, err = run_cli([*argv, *(a for o in overrides for a in ("--set", o))], capsys)
    assert_one_line_error(code, err, f"{blocked}: cannot write the output here")
    assert "train: anchors" not in err  # nothing of the training start-up was reached
    assert _files(tmp_path) == {"blocker"}


def test_ingest_refuses_an_impossible_output_before_reading(
    tiny_dataset, tmp_path, blocked, capsys
):
    argv = ["ingest", "--format", "cuhk-sysu", "--root", str(tiny_dataset), "--out", str(blocked)]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"{blocked}: cannot write the output here")
    assert _files(tmp_path) == {"blocker"}
