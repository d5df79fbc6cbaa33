"""`psearch search --cbgm`: the re-ranked similarities follow psearch.cbgm's rule on the
stored detections, a folder gallery agrees with its extraction, and --index is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import INFERENCE_OVERRIDES
from test_search import QUERY_BOX, extracted_gallery

from psearch.cbgm import context_people, rescore
from psearch.cli import main
from psearch.config import to_dict
from psearch.data.manifest import read_manifests
from psearch.inference.context import detect_query_image
from psearch.inference.loading import load_joint
from psearch.inference.search import search
from psearch.inference.writer import recorded_manifests
from psearch.models.io import save_model
from psearch.models.joint import build_joint_net


@pytest.fixture(scope="module")
def params(inference_params):
    # Every box the random detector proposes, so that the query image has context people.
    model = dataclasses.replace(inference_params.model, box_score_thresh=0.0)
    return dataclasses.replace(inference_params, model=model)


@pytest.fixture(scope="module")
def distinct(tmp_path_factory, scene_manifests, params):
    """A random-init joint net whose people get different features, its extraction of the
    test scenes, and a folder of the same images. With torchvision's initial BatchNorm
    statistics the random trunk's activations fade to ~1e-6 and every box gets the same
    feature (cosines equal to 1 - 1e-7), which would leave CBGM's choices to float rounding;
    statistics measured on random images give cosines of 0.5 to 0.9."""
    base = tmp_path_factory.mktemp("cbgm")
    torch.manual_seed(0)
    net = build_joint_net(3, loss=to_dict(params.train.loss), **to_dict(params.model))
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain mean over the calibration batch
    net.backbone.train()
    with torch.no_grad():
        net.backbone(torch.rand(4, 3, 96, 128))
    model = save_model(base / "model.pt", net.eval())
    return {"model": model, **extracted_gallery(scene_manifests, model, params, base)}


def _search(gallery_dir, setup, params, **kwargs):
    return search(str(setup["model"]), setup["query"], QUERY_BOX, gallery_dir, params, **kwargs)


def _expected(dets_dir: Path, query_name: str, thresh: float) -> dict[str, float]:
    """{image name: best re-ranked similarity} from the stored files, by psearch.cbgm."""
    table = pq.read_table(dets_dir / "gallery_detections.parquet").to_pylist()
    info = json.loads((dets_dir / "extraction.json").read_text())
    manifests = read_manifests(recorded_manifests(dets_dir, info, None))
    names = dict(
        zip(
            manifests.images["image_id"].to_pylist(),
            manifests.images["image_name"].to_pylist(),
            strict=True,
        )
    )
    rows = [r for r in table if r["score"] >= thresh]
    # query 0 is QUERY_BOX in the query image: the extraction computed its feature the same way
    query_feature = np.asarray(
        pq.read_table(dets_dir / "query_features.parquet")["feature"][0].as_py()
    )
    own = [r for r in rows if names[r["image_id"]] == query_name]
    rows = [r for r in rows if names[r["image_id"]] != query_name]
    x, y, w, h = QUERY_BOX
    people = context_people(
        query_feature,
        np.array([x, y, x + w, y + h]),
        np.array([[r[c] for c in ("x1", "y1", "x2", "y2")] for r in own]).reshape(-1, 4),
        np.array([r["score"] for r in own]),
        np.array([r["feature"] for r in own]).reshape(len(own), -1),
    )
    feats = np.array([r["feature"] for r in rows], np.float64)
    image_of = np.array([names[r["image_id"]] for r in rows], dtype=object)
    sims = rescore(feats @ query_feature, image_of, feats, people)
    best: dict[str, float] = {}
    for name, sim in zip(image_of, sims, strict=True):
        best[name] = max(best.get(name, -np.inf), float(sim))
    assert len(people) > 1, "the query image should give context in this scene"
    return best


def test_cbgm_follows_the_rule_and_folder_agrees(distinct, params):
    kwargs = dict(top_k=20, det_thresh=0.0, cbgm=True)
    stored = _search(distinct["dets"], distinct, params, **kwargs)
    fresh = _search(distinct["folder"], distinct, params, **kwargs)
    assert any("CBGM" in note for note in stored["notes"])
    expected = _expected(distinct["dets"], distinct["query"].name, 0.0)
    got = {Path(m["image"]).name: m["similarity"] for m in stored["matches"]}
    assert got == pytest.approx(expected, abs=1e-4)
    assert [Path(m["image"]).name for m in fresh["matches"]] == list(got)
    for a, b in zip(stored["matches"], fresh["matches"], strict=True):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-4)
    plain = _search(distinct["dets"], distinct, params, top_k=20, det_thresh=0.0)
    assert [m["similarity"] for m in plain["matches"]] != [
        m["similarity"] for m in stored["matches"]
    ]


def test_cbgm_with_an_index_is_refused(random_models, tmp_path, capsys):
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    argv = ["search", "--model", str(random_models["joint"]), "--query", str(tmp_path / "q.png")]
    code = main([*argv, "--box", "1,1,5,5", "--index", str(tmp_path), "--cbgm", *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "--cbgm needs --gallery" in err[-1]


def test_a_query_image_without_detections_has_no_context(distinct, params):
    # No box scores above 1: the query image has no detections (this crashed on reshaping the
    # empty feature array) and the folder's images none either, so there is nothing to rank.
    model = dataclasses.replace(params.model, box_score_thresh=1.0)
    strict = dataclasses.replace(params, model=model)
    cpu = torch.device("cpu")
    joint, _ = load_joint(str(distinct["model"]), strict, cpu)
    boxes, scores, features = detect_query_image(distinct["query"], joint, strict, cpu, 0.0)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and features.shape == (0, 32)
    found = _search(distinct["folder"], distinct, strict, top_k=20, det_thresh=0.0, cbgm=True)
    assert found["matches"] == []
