"""`psearch extract` under faults, one row each: a missing or unreadable model, missing or
corrupt manifests, an unreadable video, an output that cannot be written, a disk that is
full or too small. Each is exit 2 with one line `error: ...` naming the culprit, and the
exact set of files left in the working directory. (A model file that would run code: see
test_faults_pickles.)"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from conftest import INFERENCE_OVERRIDES

from faults.helpers import assert_one_line_error, files_under, run_cli
from psearch import diskspace
from psearch.inference import extract as extract_module

SETS = [arg for value in INFERENCE_OVERRIDES for arg in ("--set", value)]


def _copy_manifests(source: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(source, tmp / "manifests"))


def _missing_model(tmp, manifests, model, monkeypatch):
    return ["--manifests", str(manifests), "--model", str(tmp / "nope.pt")]


def _garbage_model(tmp, manifests, model, monkeypatch):
    (tmp / "garbage.pt").write_bytes(b"not a torch file " * 40)
    return ["--manifests", str(manifests), "--model", str(tmp / "garbage.pt")]


def _missing_manifests(tmp, manifests, model, monkeypatch):
    return ["--manifests", str(tmp / "no-manifests"), "--model", str(model)]


def _corrupt_images_table(tmp, manifests, model, monkeypatch):
    copy = _copy_manifests(manifests, tmp)
    (copy / "images.parquet").write_bytes(b"PAR1 truncated")
    return ["--manifests", str(copy), "--model", str(model)]


def _missing_queries_table(tmp, manifests, model, monkeypatch):
    copy = _copy_manifests(manifests, tmp)
    (copy / "queries.parquet").unlink()
    return ["--manifests", str(copy), "--model", str(model)]


def _garbage_video(tmp, manifests, model, monkeypatch):
    (tmp / "clip.mp4").write_bytes(os.urandom(4096))
    return ["--video", str(tmp / "clip.mp4"), "--model", str(model)]


def _full_disk(tmp, manifests, model, monkeypatch):
    """ENOSPC on the last file written: the rows were written, extraction.json fails."""

    def full(directory, info, timings=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "extraction.json"))

    monkeypatch.setattr(extract_module, "write_extraction_json", full)
    return ["--manifests", str(manifests), "--model", str(model)]


def _too_little_space(tmp, manifests, model, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(
        diskspace.shutil, "disk_usage", lambda p: real(p)._replace(free=4096), raising=True
    )
    return ["--manifests", str(manifests), "--model", str(model)]


def _unwritable_output(tmp, manifests, model, monkeypatch):
    (tmp / "blocker").write_text("a file, not a directory\n")
    return ["--manifests", str(manifests), "--model", str(model), "--out", str(tmp / "blocker/x")]


# (fault, set-up, what the error line holds, files left besides the output's absence)
CASES = [
    ("missing model", _missing_model, ["nope.pt: model file not found"], set()),
    ("garbage model", _garbage_model, ["garbage.pt: not a readable psearch model file"], {"garbage.pt"}),
    ("missing manifests", _missing_manifests, ["no-manifests: manifests directory not found"], set()),
    ("corrupt images table", _corrupt_images_table, ["images.parquet: not a readable Parquet file"], {"manifests", "manifests/*"}),
    ("missing queries table", _missing_queries_table, ["queries.parquet"], {"manifests", "manifests/*"}),
    ("garbage video", _garbage_video, ["clip.mp4: not a readable video"], {"clip.mp4"}),
    ("full disk", _full_disk, ["dets/extraction.json: No space left on device"], set()),
    ("too little space", _too_little_space, ["not enough free space in", "dets: need", "have 4.0 KiB"], set()),
    ("unwritable output", _unwritable_output, ["blocker/x: cannot write the output here"], {"blocker"}),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "setup", "expected", "left"), CASES, ids=[c[0] for c in CASES])
def test_extract_fault(
    fault, setup, expected, left, tmp_path, scene_manifests, random_models, capsys, monkeypatch
):
    argv = setup(tmp_path, scene_manifests, random_models["joint"], monkeypatch)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "dets")]
    code, _, err = run_cli(["extract", *argv, *SETS], capsys)
    assert_one_line_error(code, err, *expected)
    files = files_under(tmp_path)
    if "manifests/*" in left:  # the copied manifests, whatever the table files are
        files = {f for f in files if not f.startswith("manifests/")} | {"manifests/*"}
    assert files == left
