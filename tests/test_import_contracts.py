"""The house rules (docs/architecture.md) hold, and each import-linter contract really bites.

`lint-imports` must pass on the tree as it is; and for every rule, a copy of the tree with one
back-pointing import planted in it must fail on exactly that rule.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{tree / 'src'}{os.pathsep}{tree}")
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_tree(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("src", "pipelines", "components"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_every_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# (file to plant the import in, the import, the contract that must break)
PLANTED = [
    ("src/psearch/data/manifest.py", "import psearch.train", "psearch layers only point down"),
    ("src/psearch/models/joint.py", "import psearch.config", "networks take plain arguments"),
    ("src/psearch/models/io.py", "import mlflow", "networks take plain arguments"),
    ("src/psearch/evaluation/run.py", "import psearch.cli", "subsystems never import the command"),
    ("src/psearch/stages.py", "import kfp", "the library imports no orchestrator"),
    ("src/psearch/tracking/__init__.py", "import pipelines", "the library imports no orchestrator"),
    ("src/psearch/imaging.py", "import psearch.data", "psearch layers only point down"),
]


@pytest.mark.parametrize(("path", "statement", "contract"), PLANTED, ids=[p[2] for p in PLANTED])
def test_a_planted_import_breaks_its_contract(tmp_path, path, statement, contract):
    tree = _copy_tree(tmp_path)
    target = tree / path
    target.write_text(target.read_text() + f"\n{statement}  # planted by the test\n")
    result = _lint(tree)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken), result.stdout
