"""`psearch index` under faults, one row each: NaN features, features whose size disagrees
with extraction.json, no detection to index, an unreadable gallery file, a directory that is
not an extraction, an output that cannot be written, a disk that is full or too small. Each
is exit 2 with one line `error: ...` naming the culprit, and the exact set of files left."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import INFERENCE_OVERRIDES

from faults.helpers import assert_one_line_error, files_under, run_cli
from psearch import diskspace
from psearch.data.manifest import write_parquet
from psearch.inference import index as index_module
from psearch.inference.writer import feature_array

SETS = [arg for value in [*INFERENCE_OVERRIDES, "index.det_thresh=0"] for arg in ("--set", value)]
GALLERY = "gallery_detections.parquet"


def _with_features(dets: Path, change) -> None:
    table = pq.read_table(dets / GALLERY)
    dim = table.schema.field("feature").type.list_size
    features = np.array(table.column("feature").to_pylist(), np.float32).reshape(-1, dim)
    change(features)
    table = table.set_column(
        table.schema.get_field_index("feature"), "feature", feature_array(features, dim)
    )
    write_parquet(table, dets / GALLERY)


def _nan_feature(dets, monkeypatch):
    _with_features(dets, lambda f: f.__setitem__((3, 0), np.nan))


def _other_feature_size(dets, monkeypatch):
    info = json.loads((dets / "extraction.json").read_text())
    (dets / "extraction.json").write_text(json.dumps({**info, "feat_dim": 7}))


def _no_detections(dets, monkeypatch):
    table = pq.read_table(dets / GALLERY)
    write_parquet(table.slice(0, 0), dets / GALLERY)


def _garbage_gallery(dets, monkeypatch):
    (dets / GALLERY).write_bytes(b"PAR1 not really")


def _not_an_extraction(dets, monkeypatch):
    (dets / "extraction.json").unlink()


def _full_disk(dets, monkeypatch):
    def full(index, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(index_module.faiss, "write_index", full)


def _too_little_space(dets, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: real(p)._replace(free=100))


def _unwritable_output(dets, monkeypatch):
    (dets.parent / "blocker").write_text("a file, not a directory\n")
    return dets.parent / "blocker" / "index"


# (fault, set-up of a copy of an extraction in DETS, what the error line holds, files left)
CASES = [
    ("NaN feature", _nan_feature, [f"dets/{GALLERY}: the feature of detection row 3", "not finite"], set()),
    ("feature size", _other_feature_size, [f"dets/{GALLERY}: features of 32 dimensions", "says 7"], set()),
    ("no detections", _no_detections, [f"dets/{GALLERY}: no detection with score >= 0"], set()),
    ("garbage gallery", _garbage_gallery, [f"dets/{GALLERY}: not a readable Parquet file"], set()),
    ("not an extraction", _not_an_extraction, ["dets/extraction.json: file not found"], set()),
    ("full disk", _full_disk, ["index/index.faiss: No space left on device"], set()),
    ("too little space", _too_little_space, ["not enough free space in", "index: need", "have 100 B"], set()),
    ("unwritable output", _unwritable_output, ["blocker/index: cannot write the output here"], {"blocker"}),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "setup", "expected", "left"), CASES, ids=[c[0] for c in CASES])
def test_index_fault(
    fault, setup, expected, left, tmp_path, scene_extraction, scene_manifests, capsys, monkeypatch
):
    dets = Path(shutil.copytree(scene_extraction, tmp_path / "dets"))
    out = setup(dets, monkeypatch) or tmp_path / "index"
    argv = ["index", "--detections", str(dets), "--out", str(out)]
    code, _, err = run_cli([*argv, "--manifests", str(scene_manifests), *SETS], capsys)
    assert_one_line_error(code, err, *expected)
    assert {f for f in files_under(tmp_path) if not f.startswith("dets")} == left
