"""Too little free space is refused before the work (psearch.diskspace): one line
`error: not enough free space in PATH: need X, have Y`, exit 2, nothing written. The disk
is made small by answering shutil.disk_usage for it (no mount needed)."""

from __future__ import annotations

import shutil

import pytest
from test_train import FAST

from faults.helpers import assert_one_line_error, files_under, run_cli
from psearch import diskspace
from psearch.errors import PsearchError
from psearch.synth import synthesize
from psearch.synth.generate import estimated_bytes
from psearch.synth.layout import PRESETS


@pytest.fixture
def free_bytes(monkeypatch):
    """Set how many bytes every file system has free."""
    real = shutil.disk_usage
    free = {"bytes": 0}
    monkeypatch.setattr(
        diskspace.shutil, "disk_usage", lambda path: real(path)._replace(free=free["bytes"])
    )

    def set_free(value: int) -> None:
        free["bytes"] = value

    return set_free


def test_the_message_names_the_path_and_both_sizes(tmp_path, free_bytes):
    free_bytes(3 * diskspace.MIB)
    target = tmp_path / "not" / "there" / "yet"  # measured at its nearest existing parent
    diskspace.check_free_space({target: 2 * diskspace.MIB})
    with pytest.raises(PsearchError) as caught:
        diskspace.check_free_space({target: 2 * diskspace.MIB, tmp_path / "b": 2 * diskspace.MIB})
    assert str(caught.value) == f"not enough free space in {target}: need 4.0 MiB, have 3.0 MiB"


def test_sizes_read_as_people_write_them():
    assert [diskspace.human(n) for n in (512, 1536, 5 << 20, 3 << 30)] == [
        "512 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]


def test_the_synth_estimate_covers_what_the_preset_writes(tmp_path):
    synthesize(tmp_path / "raw", preset="tiny", seed=0)
    written = sum(p.stat().st_size for p in (tmp_path / "raw").rglob("*") if p.is_file())
    assert written <= estimated_bytes(PRESETS["tiny"]) <= 10 * written


def test_synth_refuses_a_small_disk(tmp_path, free_bytes, capsys):
    free_bytes(1000)
    code, _, err = run_cli(["synth", "--preset", "tiny", "--out", str(tmp_path / "raw")], capsys)
    assert_one_line_error(code, err, f"not enough free space in {tmp_path / 'raw'}: need ")
    assert err.strip().endswith("have 1000 B")
    assert files_under(tmp_path) == set()


def test_ingest_refuses_a_small_disk(tiny_dataset, tmp_path, free_bytes, capsys):
    free_bytes(1000)
    out = tmp_path / "manifests"
    argv = ["ingest", "--format", "cuhk-sysu", "--root", str(tiny_dataset), "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"not enough free space in {out}: need 1.0 MiB")
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("stage", ["pretrain", "train"])
def test_training_refuses_a_disk_without_room_for_a_model_and_checkpoints(
    stage, tiny_manifests, tmp_path, free_bytes, capsys
):
    free_bytes(2 * diskspace.MIB)  # more than a JSON file, less than the small backbone
    out = tmp_path / "out"
    sets = [*FAST, f"{stage}.max_steps=1", "tracking.enabled=false"]
    argv = [stage, "--manifests", str(tiny_manifests), "--out", str(out)]
    code, _, err = run_cli([*argv, *(a for s in sets for a in ("--set", s))], capsys)
    assert_one_line_error(code, err, f"not enough free space in {out}: need ", "have 2.0 MiB")
    assert files_under(tmp_path) == set()  # no output, no checkpoint directory
