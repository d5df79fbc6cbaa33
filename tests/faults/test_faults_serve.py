"""`psearch serve` under faults at start-up, one row each: a missing index directory, each of
its files corrupt or missing, a missing or unreadable model. Each is exit 2 with one line
`error: ...` naming the culprit, before any port is bound, and nothing written. (Bad
requests to a running server are 4xx, never 500: tests/test_serve_fuzz.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import uvicorn
from conftest import INFERENCE_OVERRIDES

from faults.helpers import assert_one_line_error, files_under, run_cli

SETS = [arg for value in INFERENCE_OVERRIDES for arg in ("--set", value)]


def _no_index(index, model):
    shutil.rmtree(index)
    return index, model


def _garbage(name):
    def setup(index, model):
        (index / name).write_bytes(b"\x00garbage\xff" * 8)
        return index, model

    return setup


def _missing(name):
    def setup(index, model):
        (index / name).unlink()
        return index, model

    return setup


def _no_model(index, model):
    return index, index.parent / "nope.pt"


def _garbage_model(index, model):
    (index.parent / "garbage.pt").write_bytes(b"not a torch file " * 40)
    return index, index.parent / "garbage.pt"


# (fault, set-up of a copy of a built index in INDEX, what the error line holds)
CASES = [
    ("no index", _no_index, ["index: index not found"]),
    ("garbage index.json", _garbage("index.json"), ["index/index.json: not valid JSON"]),
    ("missing index.json", _missing("index.json"), ["index/index.json: No such file or directory"]),
    ("garbage index.faiss", _garbage("index.faiss"), ["index/index.faiss: not a faiss index"]),
    ("garbage detections", _garbage("detections.parquet"), ["index/detections.parquet: not a readable Parquet file"]),
    ("missing detections", _missing("detections.parquet"), ["index/detections.parquet: file not found"]),
    ("garbage images", _garbage("images.parquet"), ["index/images.parquet: not a readable Parquet file"]),
    ("missing images", _missing("images.parquet"), ["index/images.parquet: not a readable Parquet file"]),
    ("no model", _no_model, ["nope.pt: model file not found"]),
    ("garbage model", _garbage_model, ["garbage.pt: not a readable psearch model file"]),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_serve_fault_at_start(
    fault, setup, expected, tmp_path, scene_index, random_models, capsys, monkeypatch
):
    def binds_a_port(*args, **kwargs):
        raise AssertionError("the server started")  # an "internal error", exit 1: the test fails

    monkeypatch.setattr(uvicorn, "run", binds_a_port)
    index = Path(shutil.copytree(scene_index, tmp_path / "index"))
    index, model = setup(index, random_models["joint"])
    before = files_under(tmp_path)
    argv = ["serve", "--index", str(index), "--model", str(model), "--port", "0"]
    code, _, err = run_cli([*argv, *SETS], capsys)
    assert_one_line_error(code, err, *expected)
    assert files_under(tmp_path) == before
