"""A throw-away git + DVC repository holding (part of) the project's pipeline, for tests.

The stages are the project's own dvc.yaml stages; only their source-code deps
are dropped (the copy has no src/; the installed package runs the stages), and
params.yaml is the project's with the test's overrides (tiny preset, few steps).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import yaml
from servers import BIN, QUIET

ROOT = Path(__file__).resolve().parents[1]
# The tiny preset and a handful of optimiser steps: the pipeline's plumbing, not its accuracy.
TINY: dict = {
    "data": {"preset": "tiny"},
    "model": {
        "min_size": 160,
        "max_size": 256,
        "rpn_post_nms_top_n_test": 30,
        "detections_per_img": 20,
    },
    "pretrain": {"max_steps": 3, "batch_size": 32, "num_workers": 0, "checkpoint_every": 2},
    "train": {"max_steps": 4, "num_workers": 0, "checkpoint_every": 2},
    "extract": {"num_workers": 0},
}


def deep_update(tree: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


def env(**extra: str) -> dict[str, str]:
    """The environment stage commands see: the venv first on PATH, no telemetry, no outside MLflow."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PSEARCH_", "DVC_"))
    }
    return {**base, **QUIET, "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}", **extra}


def run(args: list[str], cwd: Path, environ: dict[str, str], timeout: float = 600):
    result = subprocess.run(
        args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def make_repo(path: Path, stages: list[str], params: dict) -> Path:
    """git init + dvc init at `path` with the named stages of dvc.yaml and overridden params."""
    path.mkdir(parents=True)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    kept = {}
    for name in stages:
        stage = dict(pipeline["stages"][name])
        deps = [d for d in stage.get("deps", []) if not str(d).startswith("src/")]
        if deps:
            stage["deps"] = deps
        else:
            stage.pop("deps", None)
        kept[name] = stage
    top_level = {key: value for key, value in pipeline.items() if key != "stages"}  # plots
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": kept, **top_level}, sort_keys=False))
    tree = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), params)
    (path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    shutil.copy(ROOT / ".gitignore", path / ".gitignore")
    environ = env()
    run(["git", "init", "-q"], path, environ)
    run(["git", "config", "user.email", "test@example.com"], path, environ)
    run(["git", "config", "user.name", "test"], path, environ)
    run([str(BIN / "dvc"), "init", "-q", "-f"], path, environ)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], path, environ)
    shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")
    run(["git", "add", "-A"], path, environ)
    run(["git", "commit", "-q", "-m", "pipeline"], path, environ)
    return path


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
