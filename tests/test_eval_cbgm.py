"""CBGM re-ranking (psearch.evaluation.cbgm): context decides a constructed case; with only
the query itself as context nothing changes; `psearch evaluate --cbgm` writes the usual files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from eval_reference import _iou, gallery_candidates
from scipy.optimize import linear_sum_assignment
from test_eval_cli import _evaluate, tiny_detections  # noqa: F401  (a fixture)
from test_eval_vs_reference import _table, random_case

from psearch.cbgm import match_image, selected
from psearch.config import EvaluateConfig
from psearch.data.manifest import Manifests
from psearch.evaluation.cbgm import ContextReranker, query_people
from psearch.evaluation.inputs import build_eval_data
from psearch.evaluation.run import score_search
from psearch.evaluation.search import SearchScorer

DIM = 8
SIZE = 3  # one protocol: the two candidate images and a distractor


def _axis(i: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float64)[i]


def _mix(similarity: float, to: int, spare: int) -> np.ndarray:
    """A unit vector whose dot product with axis `to` is `similarity` (rest on axis `spare`)."""
    return similarity * _axis(to) + np.sqrt(1 - similarity**2) * _axis(spare)


A, B, C = (30, 30, 80, 150), (120, 30, 170, 150), (220, 30, 270, 150)


def context_case():
    """Query person A beside companion B in image 0. Image 1 holds A (similarity 0.80) beside
    B; image 2 holds an impostor X (0.85) beside a stranger. Image 3 is a distractor."""
    names = [f"s{i}.jpg" for i in range(4)]
    images = _table(
        "images",
        {
            "image_id": [0, 1, 2, 3],
            "image_name": names,
            "path": [f"Image/SSM/{n}" for n in names],
            "width": [400] * 4,
            "height": [200] * 4,
            "split": ["test"] * 4,
        },
    )
    annotated = [(0, A, 0), (0, B, -1), (1, A, 0), (1, B, -1), (2, A, -1), (2, B, -1), (3, C, -1)]
    boxes = _table(
        "boxes",
        {
            "box_id": list(range(len(annotated))),
            "image_id": [r[0] for r in annotated],
            **{
                c: [float(r[1][i]) for r in annotated]
                for i, c in enumerate(("x1", "y1", "x2", "y2"))
            },
            "person_id": [r[2] for r in annotated],
            "is_hard": [False] * len(annotated),
        },
    )
    persons = _table("persons", {"person_id": [0], "person_name": ["p0"], "split": ["test"]})
    queries = _table(
        "queries",
        {
            "query_id": [0],
            "person_id": [0],
            "image_id": [0],
            **{c: [float(A[i])] for i, c in enumerate(("x1", "y1", "x2", "y2"))},
            "occluded": [False],
            "low_resolution": [False],
        },
    )
    listed = [(1, A), (2, None), (3, None)]
    galleries = _table(
        "galleries",
        {
            "gallery_size": [SIZE] * 3,
            "query_id": [0] * 3,
            "image_id": [g[0] for g in listed],
            **{
                f"gt_{c}": [None if g[1] is None else float(g[1][i]) for g in listed]
                for i, c in enumerate(("x1", "y1", "x2", "y2"))
            },
        },
    )
    manifests = Manifests(Path("memory"), images, boxes, persons, queries, galleries, {})
    detections = [  # (image, box, score, feature)
        (0, A, 0.95, _axis(0)),  # the query person themself: never their own context
        (0, B, 0.90, _axis(1)),  # the companion
        (0, C, 0.30, _axis(7)),  # below det_thresh: not context
        (1, A, 0.90, _mix(0.80, 0, 3)),
        (1, B, 0.90, _mix(0.90, 1, 4)),
        (2, A, 0.90, _mix(0.85, 0, 5)),  # the impostor
        (2, B, 0.90, _axis(6)),
        (3, C, 0.90, _mix(0.10, 0, 2)),
    ]
    dets = pa.table(
        [
            pa.array([d[0] for d in detections], pa.int32()),
            *[pa.array([float(d[1][i]) for d in detections], pa.float32()) for i in range(4)],
            pa.array([d[2] for d in detections], pa.float32()),
            pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([d[3] for d in detections]).astype(np.float32)), DIM
            ),
        ],
        names=["image_id", "x1", "y1", "x2", "y2", "score", "feature"],
    )
    query_feats = pa.table(
        [
            pa.array([0], pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(_axis(0).astype(np.float32)), DIM),
        ],
        names=["query_id", "feature"],
    )
    return manifests, dets, query_feats


def _scores(manifests, dets, qfeats, cbgm: bool, size: int = SIZE):
    data = build_eval_data(manifests, dets, qfeats)
    cfg = EvaluateConfig(cbgm=cbgm)
    scorer, protocols, scores = score_search(data, manifests.galleries, cfg, [size])
    return scorer, protocols[0], scores[size]


def test_context_decides_the_ranking():
    manifests, dets, qfeats = context_case()
    _, _, plain = _scores(manifests, dets, qfeats, cbgm=False)
    assert (plain.rank[0], plain.ap[0]) == (2, pytest.approx(0.5))  # the impostor is first

    scorer, protocol, revised = _scores(manifests, dets, qfeats, cbgm=True)
    assert (revised.rank[0], revised.ap[0], revised.count_tp[0]) == (1, pytest.approx(1.0), 1)
    # The rule: the true match's similarity becomes 0.80 + 0.90 (query -> A, companion -> B);
    # the impostor's image has no companion, so its similarity stays 0.85.
    top = scorer.ranked_candidates(protocol, revised, 0, k=4)
    assert [(round(sim, 5), correct) for _, sim, correct in top[:2]] == [(1.7, True), (0.85, False)]


def test_query_people_are_the_query_then_its_companions_by_score():
    manifests, dets, qfeats = context_case()
    data = build_eval_data(manifests, dets, qfeats)
    scorer = SearchScorer(data, det_thresh=0.5)
    people = query_people(data, scorer.candidates, scorer.image_ptr, scorer.gallery, 3)
    # Not the query person's own detection (IoU 1 with the query box), not the 0.30 one.
    np.testing.assert_allclose(people[0], np.stack([_axis(0), _axis(1)]))
    alone = query_people(data, scorer.candidates, scorer.image_ptr, scorer.gallery, 1)
    np.testing.assert_allclose(alone[0], _axis(0)[None])


@pytest.mark.parametrize("seed", range(12))
def test_without_context_people_cbgm_changes_nothing(seed):
    """The query alone matches its best candidate at its own similarity: scores as plain."""
    manifests, dets, qfeats = random_case(seed, lattice=bool(seed % 2))
    data = build_eval_data(manifests, dets, qfeats)
    cfg = EvaluateConfig(det_thresh=0.3)
    _, protocols, plain = score_search(data, manifests.galleries, cfg, [4, 8, -1])
    scorer = SearchScorer(data, cfg.det_thresh)
    scorer.reranker = ContextReranker(
        data, scorer.candidates, scorer.image_ptr, scorer.gallery, people=1
    )
    alone = scorer.score(protocols)
    for p in protocols:
        np.testing.assert_array_equal(alone[p.size].ap, plain[p.size].ap)
        np.testing.assert_array_equal(alone[p.size].rank, plain[p.size].rank)


def reference_cbgm(manifests, dets, qfeats, size: int, det_thresh: float) -> dict:
    """{(query_id, image_id): [similarity per candidate]} after CBGM, for the query's gallery
    images, by a plain loop over the rule in psearch.evaluation.cbgm's docstring."""
    candidates = gallery_candidates(dets, det_thresh)  # file order within an image
    scores = {}
    for r in dets.to_pylist():  # the scores of the candidates, in the same order
        if np.float32(r["score"]) >= np.float32(det_thresh):
            scores.setdefault(r["image_id"], []).append(r["score"])
    feature = {r["query_id"]: np.asarray(r["feature"], np.float64) for r in qfeats.to_pylist()}
    test = [r["image_id"] for r in manifests.images.to_pylist() if r["split"] == "test"]
    out = {}
    for q in manifests.queries.to_pylist():
        own, box = q["image_id"], (q["x1"], q["y1"], q["x2"], q["y2"])
        if size == -1:
            gallery = [i for i in test if i != own]
        else:
            rows = manifests.galleries.to_pylist()
            gallery = [
                g["image_id"]
                for g in rows
                if (g["gallery_size"], g["query_id"]) == (size, q["query_id"])
            ]
            gallery = [i for i in gallery if i != own]
        others = [
            (-s, k, f)
            for k, ((b, f), s) in enumerate(
                zip(candidates.get(own, []), scores.get(own, []), strict=True)
            )
            if _iou(b, box) <= 0.5
        ]
        people = [feature[q["query_id"]]] + [
            f for _, _, f in sorted(others, key=lambda t: t[:2])[:2]
        ]
        sims = {
            i: [np.float32(f @ feature[q["query_id"]]) for _, f in candidates.get(i, [])]
            for i in gallery
        }
        flat = sorted((v for i in gallery for v in sims[i]), reverse=True)
        cut = flat[min(10, len(flat)) - 1] if flat else np.inf
        for i in gallery:
            if sims[i] and max(sims[i]) >= cut:
                weights = np.array([[p @ f for _, f in candidates[i]] for p in people])
                rows, cols = linear_sum_assignment(weights, maximize=True)
                if 0 in rows:
                    sims[i][int(cols[list(rows).index(0)])] = np.float32(weights[rows, cols].sum())
            out[(q["query_id"], i)] = sims[i]
    return out


@pytest.mark.parametrize("seed", range(10))
def test_revised_similarities_match_a_plain_loop(seed):
    manifests, dets, qfeats = random_case(seed, lattice=bool(seed % 2))
    det_thresh = 0.3
    data = build_eval_data(manifests, dets, qfeats)
    cfg = EvaluateConfig(det_thresh=det_thresh, cbgm=True)
    scorer, protocols, _ = score_search(data, manifests.galleries, cfg, [4, 8, -1])
    for p in protocols:
        expected = reference_cbgm(manifests, dets, qfeats, p.size, det_thresh)
        for row in p.queries:
            sims = scorer.similarities(slice(row, row + 1))
            got, best = scorer.protocol_similarities(p, row, row + 1, sims, scorer.image_max(sims))
            np.testing.assert_array_equal(best, scorer.image_max(got))
            got = got[0]
            members = np.flatnonzero(scorer.image_members(p, row, row + 1)[0])
            for image in members:
                c0, c1 = scorer.image_ptr[image], scorer.image_ptr[image + 1]
                key = (int(data.query_ids[row]), int(data.image_ids[image]))
                np.testing.assert_allclose(got[c0:c1], expected.pop(key), rtol=0, atol=1e-6)
        assert not [k for k in expected if expected[k]], "images the scorer left out"


def test_cli_cbgm_writes_the_usual_metrics(tiny_manifests, tiny_detections, tmp_path, capsys):  # noqa: F811
    plain_out, cbgm_out = tmp_path / "plain", tmp_path / "cbgm"
    assert _evaluate(tiny_manifests, tiny_detections, plain_out, "--no-plots") == 0
    t0 = time.perf_counter()
    assert _evaluate(tiny_manifests, tiny_detections, cbgm_out, "--no-plots", "--cbgm") == 0
    seconds = time.perf_counter() - t0
    plain = json.loads((plain_out / "metrics.json").read_text())
    revised = json.loads((cbgm_out / "metrics.json").read_text())
    assert list(revised["search"]) == list(plain["search"])
    for name, entry in revised["search"].items():
        assert set(entry) == set(plain["search"][name])
        assert entry["queries"] == plain["search"][name]["queries"]
    assert revised["detection"] == plain["detection"]
    assert (cbgm_out / "per_query.parquet").is_file() and (
        cbgm_out / "worst_queries.json"
    ).is_file()
    with_params = tmp_path / "params"
    assert (
        _evaluate(
            tiny_manifests,
            tiny_detections,
            with_params,
            "--no-plots",
            "--set",
            "evaluate.cbgm=true",
        )
        == 0
    )
    assert json.loads((with_params / "metrics.json").read_text()) == revised
    g100 = [
        revised["search"]["gallery_100"][k] - plain["search"]["gallery_100"][k]
        for k in ("mAP", "top1")
    ]
    with capsys.disabled():
        print(
            f"\n[cbgm] tiny preset evaluate --cbgm: {seconds:.2f} s; gallery_100 mAP/top-1 change {g100}"
        )


def test_selection_keeps_ties_and_skips_outsiders():
    sims = np.array([0.9, 0.5, 0.7, 0.7, -np.inf, 0.1])
    assert selected(sims, 3).tolist() == [True, False, True, True, False, False]
    assert selected(sims, 2).tolist() == [True, False, True, True, False, False]  # tie at 2nd
    assert selected(sims, 9).tolist() == [True, True, True, True, False, True]
    assert not selected(sims, 0).any()


def test_the_query_left_unassigned_revises_nothing():
    people = np.stack([_axis(0), _axis(1)])
    assert match_image(people, _axis(1)[None]) is None  # the companion takes the one candidate
    assert match_image(people, np.stack([_axis(1), _mix(0.5, 0, 2)])) == (1, pytest.approx(1.5))
