"""`psearch search --cbgm`: the re-ranked similarities follow psearch.cbgm's rule on the
stored detections, a folder gallery agrees with its extraction, and --index is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import INFERENCE_OVERRIDES
from test_search import QUERY_BOX, _search, gallery  # noqa: F401  (a fixture)

from psearch.cbgm import context_people, rescore
from psearch.cli import main
from psearch.data.manifest import read_manifests
from psearch.inference.writer import recorded_manifests


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


def test_cbgm_follows_the_rule_and_folder_agrees(gallery, random_models, inference_params):  # noqa: F811
    kwargs = dict(top_k=20, det_thresh=0.0, cbgm=True)
    stored = _search(gallery["dets"], gallery["query"], random_models, inference_params, **kwargs)
    fresh = _search(gallery["folder"], gallery["query"], random_models, inference_params, **kwargs)
    assert any("CBGM" in note for note in stored["notes"])
    expected = _expected(gallery["dets"], gallery["query"].name, 0.0)
    got = {Path(m["image"]).name: m["similarity"] for m in stored["matches"]}
    assert got == pytest.approx(expected, abs=1e-4)
    assert [Path(m["image"]).name for m in fresh["matches"]] == list(got)
    for a, b in zip(stored["matches"], fresh["matches"], strict=True):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-4)
    plain = _search(
        gallery["dets"], gallery["query"], random_models, inference_params, top_k=20, det_thresh=0.0
    )
    assert [m["similarity"] for m in plain["matches"]] != [
        m["similarity"] for m in stored["matches"]
    ]


def test_cbgm_with_an_index_is_refused(random_models, tmp_path, capsys):
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    argv = ["search", "--model", str(random_models["joint"]), "--query", str(tmp_path / "q.png")]
    code = main([*argv, "--box", "1,1,5,5", "--index", str(tmp_path), "--cbgm", *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "--cbgm needs --gallery" in err[-1]
