"""psearch index: what INDEX holds, exact = full-matrix ranking, approximate kinds, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import INFERENCE_OVERRIDES

from psearch.cli import main
from psearch.config import IndexConfig
from psearch.errors import PsearchError
from psearch.inference.index import (
    GalleryIndex,
    build_index,
    fill_index,
    make_index,
    read_index_json,
    set_search_params,
    weights_fingerprint,
)
from psearch.inference.search import rank_images, search
from psearch.inference.writer import gallery_table
from psearch.models.io import load_model

SETS = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]


@pytest.fixture(scope="module")
def distinct_extraction(scene_extraction, tmp_path_factory):
    """The scene extraction with random unit features: a random-init model gives nearly equal
    features to every box, and ties would make the ranking comparisons say nothing."""
    out = tmp_path_factory.mktemp("distinct") / "dets"
    out.mkdir()
    shutil.copy(scene_extraction / "extraction.json", out / "extraction.json")
    table = pq.read_table(scene_extraction / "gallery_detections.parquet")
    feats = np.random.default_rng(3).standard_normal((table.num_rows, 32)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    columns = [table.column(c).to_numpy() for c in ("image_id", "x1", "y1", "x2", "y2", "score")]
    boxes = np.stack(columns[1:5], 1)
    pq.write_table(
        gallery_table(columns[0], boxes, columns[5], feats, 32),
        out / "gallery_detections.parquet",
    )
    return out


def test_index_holds_every_detection_with_its_image_box_score_and_versions(
    scene_index, scene_extraction, random_models
):
    meta = read_index_json(scene_index)
    table = pq.read_table(scene_extraction / "gallery_detections.parquet")
    rows = pq.read_table(scene_index / "detections.parquet")
    assert meta["detections"] == table.num_rows == rows.num_rows > 0
    assert meta["kind"] == "flat" and meta["dim"] == 32 and meta["images"] == 8
    assert meta["data_version"] == "sha256:scenes"
    assert meta["model"]["uri"] == str(random_models["joint"])
    assert meta["model"]["fingerprint"] == weights_fingerprint(
        load_model(random_models["joint"])[0]
    )
    for name in ("image_id", "x1", "y1", "x2", "y2", "score"):
        assert rows.column(name).to_pylist() == pytest.approx(table.column(name).to_pylist())
    index = GalleryIndex(scene_index)
    assert sorted(index.images) == list(range(2, 10))
    assert all(Path(image.path).is_file() for image in index.images.values())


def test_exact_index_ranks_like_the_full_matrix(distinct_extraction, index_params, tmp_path):
    build_index(distinct_extraction, tmp_path / "index", index_params)
    table = pq.read_table(distinct_extraction / "gallery_detections.parquet")
    feats = np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float32)
    ids = table.column("image_id").to_numpy()
    boxes = np.stack([table.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    scores = table.column("score").to_numpy()
    index = GalleryIndex(tmp_path / "index")
    rng = np.random.default_rng(1)
    for query in [feats[5], feats[40], rng.standard_normal(32).astype(np.float32)]:
        expected = rank_images(ids.astype(object), boxes, scores, feats @ query, top_k=5)
        got = index.search(query, top_k=5)
        assert [m["image_id"] for m in got] == [int(m["image"]) for m in expected]
        assert [m["similarity"] for m in got] == pytest.approx(
            [m["similarity"] for m in expected], abs=1e-5
        )
    # Excluded images and low scores never come back; fewer images than asked is fine.
    got = index.search(feats[0], top_k=20, exclude_images={2, 3})
    assert len(got) == 6 and {2, 3}.isdisjoint(m["image_id"] for m in got)
    assert index.search(feats[0], top_k=3, min_score=2.0) == []


@pytest.mark.parametrize(
    "cfg",
    [
        IndexConfig(kind="ivf", nlist=16, nprobe=8),
        IndexConfig(kind="ivf", nlist=16, nprobe=8, pq_m=16),
        IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64),
    ],
    ids=["ivf-flat", "ivf-pq", "hnsw"],
)
def test_approximate_kinds_find_the_exact_neighbours(cfg):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    data = centres[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, 32))
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    queries = data[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    exact = fill_index(make_index(IndexConfig(), 32, len(data)), data)
    approx = fill_index(make_index(cfg, 32, len(data)), data)
    set_search_params(approx, cfg)
    _, truth = exact.search(queries, 10)
    _, found = approx.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    # (8-bit PQ codes blur near neighbours: far above chance, 10/4000, not exact.)
    assert recall >= (0.4 if cfg.pq_m else 0.9)


def test_cli_index_then_search_with_it(distinct_extraction, random_models, tmp_path, capsys):
    out = tmp_path / "ivf"
    code = main(
        ["index", "--detections", str(distinct_extraction), "--out", str(out), "--kind", "ivf"]
        + [*SETS, "--set", "index.det_thresh=0.0", "--set", "index.nlist=2"]
    )
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "ivf" and info["nlist"] == 2 and (out / "index.faiss").is_file()

    query = Path(GalleryIndex(out).images[2].path)
    common = ["search", "--model", str(random_models["joint"]), "--query", str(query)]
    common += ["--box", "12,15,30,80", "--top-k", "3", "--det-thresh", "0", *SETS]
    assert main([*common, "--set", "index.nprobe=2", "--index", str(out)]) == 0
    with_index = capsys.readouterr().out.strip().splitlines()
    assert main([*common, "--gallery", str(distinct_extraction)]) == 0
    with_matrix = capsys.readouterr().out.strip().splitlines()
    assert with_index == with_matrix and len(with_index) == 4


def test_search_notes_a_model_other_than_the_indexs(
    scene_index, random_models, inference_params, tmp_path
):
    query = Path(GalleryIndex(scene_index).images[2].path)
    model = load_model(random_models["joint"])[0]
    for parameter in model.parameters():
        parameter.data.add_(0.01)
    from psearch.models.io import save_model

    other = save_model(tmp_path / "other.pt", model)
    result = search(
        str(other), query, [12, 15, 30, 80], None, inference_params, det_thresh=0.0,
        index=scene_index,
    )  # fmt: skip
    assert result["source"] == "index" and len(result["matches"]) == 7
    assert any("not this model" in note for note in result["notes"])


def test_bad_input(scene_extraction, index_params, tmp_path):
    with pytest.raises(PsearchError, match="not an extraction output"):
        build_index(tmp_path, tmp_path / "out", index_params)
    strict = dataclasses.replace(
        index_params, index=dataclasses.replace(index_params.index, det_thresh=1.5)
    )
    with pytest.raises(PsearchError, match="no detection with score >= 1.5"):
        build_index(scene_extraction, tmp_path / "out", strict)
    pq_bad = dataclasses.replace(
        index_params, index=IndexConfig(kind="ivf", pq_m=5, nlist=1, det_thresh=0.0)
    )
    with pytest.raises(PsearchError, match="must divide the feature size 32"):
        build_index(scene_extraction, tmp_path / "out", pq_bad)
    too_many = dataclasses.replace(
        index_params, index=IndexConfig(kind="ivf", nlist=500, det_thresh=0.0)
    )
    with pytest.raises(PsearchError, match="cannot train 500 lists"):
        build_index(scene_extraction, tmp_path / "out", too_many)
    assert not (tmp_path / "out").exists()
    with pytest.raises(PsearchError, match="not a psearch index"):
        GalleryIndex(tmp_path)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["index", "--detections", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "extraction.json" in err and "\n" not in err
