"""Temporary outputs of a killed stage are cleaned at the next start of that stage: what a
`kill -9` leaves beside an output (`.NAME.tmp-PID-HOST-*`) is removed by the next write of
the same output, and nothing else is (a live writer's, another machine's, another output's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from psearch import atomic
from psearch.atomic import atomic_dir, atomic_file

SRC = Path(__file__).resolve().parents[2] / "src"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_only_a_dead_local_writers_leftovers_of_this_output_are_removed(tmp_path):
    dead, host = _dead_pid(), atomic._HOST
    stale_dir = tmp_path / f".out.tmp-{dead}-{host}-a1"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "half-written.parquet").write_bytes(b"x")
    stale_file = tmp_path / f".out.old-{dead}-{host}-0"
    stale_file.write_bytes(b"x")
    kept = {
        f".out.tmp-{dead}-00000000-b2",  # another machine's (a shared volume)
        f".out.tmp-{os.getpid()}-{host}-c3",  # a live writer's
        f".other.tmp-{dead}-{host}-d4",  # another output's
    }
    for name in kept:
        (tmp_path / name).mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("ok")
    assert _names(tmp_path) == kept | {"out"}
    assert (tmp_path / "out" / "done").read_text() == "ok"


def test_atomic_files_clean_up_too(tmp_path):
    stale = tmp_path / f".model.pt.tmp-{_dead_pid()}-{atomic._HOST}-zz"
    stale.write_bytes(b"partial")
    with atomic_file(tmp_path / "model.pt") as tmp:
        tmp.write_bytes(b"whole")
    assert _names(tmp_path) == {"model.pt"}


def test_a_killed_synth_leaves_nothing_after_the_next_run(tmp_path):
    """kill -9 while `psearch synth` writes; the rerun removes the hidden leftover."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-m", "psearch", "synth", "--preset", "tiny", "--out", "data"]
    child = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".data.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = list(tmp_path.glob(".data.tmp-*"))
    assert leftovers and not (tmp_path / "data").exists()
    rerun = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _names(tmp_path) == {"data"}
