"""The run cache of `psearch paper`: each step's output directory is keyed on a hash of what
it reads, so a re-run skips every step already finished with the same inputs and params.

A step is a name, the params sections it reads, and its inputs: the keys of the steps whose
outputs it reads (or a dataset's content hash). Its key hashes those with the psearch
version; its directory is ROOT/NAME-KEY[:12], written by the stage function as its normal
output (atomically), and step.json, written last, marks it finished. A step whose inputs or
params change gets a new key, so a new directory; the old one stays until deleted. Code
edits within one psearch version do not change keys: delete ROOT (or one step's directory)
to recompute after editing the code.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psearch import __version__
from psearch.atomic import write_text_atomic

STEP_FILE = "step.json"
KEY_CHARS = 12  # of the sha256 in a step's directory name: unique enough for one report


@dataclass(frozen=True)
class StepResult:
    name: str
    key: str
    directory: Path
    cached: bool  # finished by an earlier run: skipped this time
    seconds: float  # the step's own run time (when cached: the time it took then)


class RunCache:
    """Steps under `root`; `run` does one unless it is already finished."""

    def __init__(self, root: Path, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.results: list[StepResult] = []

    @staticmethod
    def key(name: str, settings: dict[str, Any], inputs: list[str]) -> str:
        text = json.dumps(
            {"step": name, "version": __version__, "settings": settings, "inputs": inputs},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def run(
        self,
        name: str,
        settings: dict[str, Any],
        inputs: list[str],
        work: Callable[[Path], Any],
    ) -> StepResult:
        """`work(directory)` writes the step's output into `directory`, unless a finished
        step with the same key is there already."""
        key = self.key(name, settings, inputs)
        directory = self.root / f"{name}-{key[:KEY_CHARS]}"
        done = _finished(directory, key)
        if done is not None:
            result = StepResult(name, key, directory, True, float(done.get("seconds", 0.0)))
            self.log(f"paper: {name}: finished earlier ({directory}), skipped")
        else:
            self.log(f"paper: {name}: running -> {directory}")
            started = time.perf_counter()
            work(directory)  # a stage function: replaces the directory atomically
            seconds = round(time.perf_counter() - started, 2)
            record = {"step": name, "key": key, "inputs": inputs, "settings": settings}
            record["seconds"] = seconds
            write_text_atomic(directory / STEP_FILE, json.dumps(record, indent=2, default=str))
            result = StepResult(name, key, directory, False, seconds)
            self.log(f"paper: {name}: done in {seconds:.1f} s")
        self.results.append(result)
        return result


def _finished(directory: Path, key: str) -> dict[str, Any] | None:
    """step.json of a finished step with this key, else None."""
    try:
        record = json.loads((directory / STEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None
