"""A small gallery index and search service for the serving tests (random-init model)."""

from __future__ import annotations

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
