"""A small gallery index and search service for the serving tests (random-init model), and
`psearch serve` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from psearch.inference.extract import extract
from psearch.inference.index import build_index


@pytest.fixture(scope="session")
def scene_extraction(tmp_path_factory, scene_manifests, random_models, inference_params):
    """`psearch extract` of the test scenes with the random joint model (every detection)."""
    out = tmp_path_factory.mktemp("serving") / "dets"
    extract(scene_manifests, str(random_models["joint"]), out, inference_params)
    return out


@pytest.fixture(scope="session")
def index_params(inference_params):
    """Index every detection (the random model's scores are low)."""
    import dataclasses

    return dataclasses.replace(
        inference_params, index=dataclasses.replace(inference_params.index, det_thresh=0.0)
    )


@pytest.fixture(scope="session")
def scene_index(tmp_path_factory, scene_extraction, index_params):
    out = tmp_path_factory.mktemp("serving") / "index"
    build_index(scene_extraction, out, index_params)
    return out


@pytest.fixture(scope="session")
def search_service(scene_index, random_models, index_params):
    from psearch.serving.service import SearchService

    service = SearchService(scene_index, str(random_models["joint"]), index_params)
    yield service
    service.stop()


@contextlib.contextmanager
def serve_process(index: Path, model: Path, log: Path) -> Iterator[str]:
    """`psearch serve` of `index` with `model` in a subprocess on 127.0.0.1 (a free port);
    yields its base URL once /healthz answers."""
    import httpx
    from conftest import INFERENCE_OVERRIDES

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, "-m", "psearch", "serve", "--index", str(index),
        "--model", str(model), "--port", str(port),
        "--reload-interval", "0", "--log-level", "warning", *sets,
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"psearch serve exited {process.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"psearch serve did not answer in 60 s: {log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, scene_index, random_models):
    """`psearch serve` of the scene index in a subprocess; yields its base URL."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(scene_index, random_models["joint"], log) as url:
        yield url
