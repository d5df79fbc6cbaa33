"""Shared by the fault-injection tests: a pickle that runs code when loaded, and running a
`psearch` command in-process to check the one-line error contract.

(A module of the `faults` package rather than a conftest: test modules elsewhere import
`conftest` by name, and a second conftest module would shadow theirs.)"""

from __future__ import annotations

from pathlib import Path

import torch

from psearch.cli import main


class RunsCode:
    """Unpickling this calls `open(marker, "w")`: the marker file appearing proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(path: Path, marker: Path, **around) -> Path:
    """A torch file at `path` whose loading (without weights_only) creates `marker`;
    `around` adds plain entries beside the payload (a checkpoint's fingerprint, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**around, "state_dict": RunsCode(marker)}, path)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `psearch ARGV` run in this process."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *expected: str, exit_code: int = 2) -> str:
    """The command failed with `exit_code`, its stderr ending in one line `error: ...` that
    holds `expected` (progress lines before it are fine; a traceback is not)."""
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert lines and lines[-1].startswith("error: "), err
    assert not any("Traceback" in line or line.startswith("error") for line in lines[:-1]), err
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def files_under(root: Path) -> set[str]:
    """Every file and directory below `root`, relative to it: what a failed command left."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}
