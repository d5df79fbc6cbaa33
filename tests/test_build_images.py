"""scripts/build_images.sh (`make images`) with a recording stand-in for podman.

What it hands the engine: the Docker image format (podman drops SHELL otherwise), the
project's containers.conf, the local base image, the host pip's index configuration
(local indexes mounted read-only, a PEP 503 tree from its parent so ../../files/ resolves),
and an explicit torch source for the CPU image. The real builds are `make images`; the
containers test (tests/test_pipeline_containers.py) runs the DAG in what they produce.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_ENGINE = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "conf": os.environ.get("CONTAINERS_CONF")}) + "\\n")
"""


def _run(tmp_path: Path, pip_config: str, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text(FAKE_ENGINE)
    (bin_dir / "pip").write_text(f"#!/bin/sh\ncat <<'EOF'\n{pip_config}\nEOF\n")
    for tool in ("podman", "pip"):
        (bin_dir / tool).chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    run_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "PIP": str(bin_dir / "pip"),
        "CONTAINER_ENGINE": "podman",
        **env,
    }
    result = subprocess.run(
        ["bash", "scripts/build_images.sh", "cpu:1", "gpu:1"],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, [json.loads(line) for line in lines]


def _builds(calls: list) -> list[list[str]]:
    return [c["argv"] for c in calls if c["argv"][:1] == ["build"]]


def test_podman_builds_both_images_from_the_local_base_with_the_hosts_pip_indexes(tmp_path):
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    config = (
        f"global.extra-index-url='file://{index} https://extra.example/simple'\n"
        f"global.find-links='{tmp_path / 'missing-wheels'}'\n"
        ":env:.index-url='https://mirror.example/pypi/simple'\n"
        "global.index-url='https://ignored.example/simple'"
    )
    result, calls = _run(tmp_path, config, PSEARCH_TORCH_SOURCE="pypi")
    assert result.returncode == 0, result.stderr
    assert all(c["conf"] == str(REPO / "docker" / "containers.conf") for c in calls)
    cpu, gpu = _builds(calls)
    for argv in (cpu, gpu):
        assert argv[argv.index("--format") + 1] == "docker"
        assert "BASE_IMAGE=localhost/psearch-base:bookworm" in argv
        # The environment's index wins over the global file's, as in pip.
        assert "PIP_INDEX_URL=https://mirror.example/pypi/simple" in argv
        extra = f"PIP_EXTRA_INDEX_URL=file://{index} https://extra.example/simple"
        assert extra in argv
        mirror = index.parent
        assert f"{mirror}:{mirror}:ro" in argv  # the tree's parent: wheels are ../../files/
        assert not any(a.startswith("PIP_FIND_LINKS=") for a in argv)  # a missing directory
    assert cpu[cpu.index("-f") + 1] == "docker/Dockerfile" and "TORCH_SOURCE=pypi" in cpu
    assert gpu[gpu.index("-f") + 1] == "docker/Dockerfile.cuda"
    assert not any(a.startswith("TORCH_SOURCE=") for a in gpu)
    assert "skipping pip location" in result.stderr


def test_an_unknown_torch_source_fails_the_build_not_falls_back(tmp_path):
    """The script passes TORCH_SOURCE through; the Dockerfile's case rejects other values."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert 'expected cpu-index or pypi" >&2; exit 2' in text
    result, calls = _run(tmp_path, "", CONTAINER_ENGINE="rkt")
    assert result.returncode == 2 and "CONTAINER_ENGINE=rkt" in result.stderr
    assert calls == []
