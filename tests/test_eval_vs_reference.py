"""The vectorised evaluator equals the plain reference loop (tests/eval_reference.py) to 1e-9.

Random manifests and detections are built directly as pyarrow tables, with the
awkward cases forced in: queries with nothing detected, gallery images without
detections, boxes just under and over the IoU rule, tiny gt boxes (rule below
0.5), boxes padded by exactly 5 px (IoU equal to the rule), a detection
straddling two people, scores equal to the thresholds, duplicated features and
lattice features where most similarities tie, the query's own image listed in
its gallery, and gallery -1 with and without cross-camera.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from eval_reference import reference_detection, reference_search
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psearch.config import EvaluateConfig
from psearch.data.manifest import MANIFEST_SCHEMAS, Manifests
from psearch.evaluation.detection import average_precision, detection_metrics
from psearch.evaluation.inputs import build_eval_data
from psearch.evaluation.run import score_search

SIZES = [4, 8, -1]
DIM = 8


def _table(name: str, columns: dict) -> pa.Table:
    return pa.table(columns, schema=MANIFEST_SCHEMAS[name])


def _lattice_features(rng, n: int) -> np.ndarray:
    """Unit vectors with four entries of +-0.5: every dot product is exact, most of them tie."""
    feats = np.zeros((n, DIM), dtype=np.float32)
    for row in feats:
        row[rng.choice(DIM, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return feats


def _random_features(rng, n: int) -> np.ndarray:
    feats = rng.normal(size=(n, DIM))
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


def _person_box(rng):
    tiny = rng.random() < 0.3
    w, h = rng.uniform(2, 14, 2) if tiny else rng.uniform(16, 90, 2)
    x, y = rng.uniform(0, 300, 2)
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def _near(rng, gt, other):
    """A detection near gt box `gt`: exact, jittered, padded by 5 px, shifted to IoU ~ 0.5
    (just under or over), or spanning gt and `other`."""
    x1, y1, x2, y2 = (float(v) for v in gt)
    w = x2 - x1
    kind = rng.integers(5)
    if kind == 0:
        return gt
    if kind == 1:
        box = gt + rng.normal(scale=0.1, size=4).astype(np.float32) * w
        return np.r_[box[:2], np.maximum(box[2:], box[:2])].astype(np.float32)
    if kind == 2:
        return np.array([x1 - 5, y1 - 5, x2 + 5, y2 + 5], dtype=np.float32)
    if kind == 3:  # a horizontal shift d gives IoU (w - d) / (w + d): 0.5 at d = w / 3
        d = w / 3 * (1 + rng.choice([-1e-3, 1e-3, 0.0]))
        return np.array([x1 + d, y1, x2 + d, y2], dtype=np.float32)
    return np.concatenate([np.minimum(gt, other)[:2], np.maximum(gt, other)[2:]])


def random_case(seed: int, lattice: bool):
    rng = np.random.default_rng(seed)
    n_test, n_train, n_persons = int(rng.integers(3, 12)), 2, int(rng.integers(1, 6))
    n_images = n_test + n_train
    names = [f"c{rng.integers(1, 4)}s1_{i:06d}.jpg" for i in range(n_images)]
    split = ["test"] * n_test + ["train"] * n_train
    images = _table(
        "images",
        {
            "image_id": list(range(n_images)),
            "image_name": names,
            "path": [f"frames/{n}" for n in names],
            "width": [400] * n_images,
            "height": [400] * n_images,
            "split": split,
        },
    )
    box_rows = []  # (image, box, person)
    occurrences: dict[int, list] = {}
    for person in range(n_persons):
        for image in rng.choice(
            n_test, size=int(rng.integers(1, min(5, n_test) + 1)), replace=False
        ):
            box = _person_box(rng)
            box_rows.append((int(image), box, person))
            occurrences.setdefault(person, []).append((int(image), box))
    for image in range(n_images):
        for _ in range(int(rng.integers(0, 3))):
            box_rows.append((image, _person_box(rng), -1 if image < n_test else n_persons))
    boxes = _table(
        "boxes",
        {
            "box_id": list(range(len(box_rows))),
            "image_id": [r[0] for r in box_rows],
            "x1": [float(r[1][0]) for r in box_rows],
            "y1": [float(r[1][1]) for r in box_rows],
            "x2": [float(r[1][2]) for r in box_rows],
            "y2": [float(r[1][3]) for r in box_rows],
            "person_id": [r[2] for r in box_rows],
            "is_hard": [False] * len(box_rows),
        },
    )
    persons = _table(
        "persons",
        {
            "person_id": list(range(n_persons + 1)),
            "person_name": [f"p{i}" for i in range(n_persons + 1)],
            "split": ["test"] * n_persons + ["train"],
        },
    )
    queries, galleries = [], []
    for qid, person in enumerate(sorted(occurrences)):
        own, qbox = occurrences[person][0]
        queries.append((qid, person, own, qbox))
        seen = {img: box for img, box in occurrences[person]}
        for size in SIZES:
            if size == -1:
                listed = [i for i in seen if i != own or rng.random() < 0.3]
            else:
                others = [i for i in range(n_test) if i not in seen]
                distractors = list(rng.permutation(others)[: max(0, size - len(seen))])
                listed = [i for i in seen if i != own or rng.random() < 0.2] + distractors
                listed = list(rng.permutation(listed))
            for image in listed:
                gt = seen.get(int(image))
                galleries.append((size, qid, int(image), gt))
    query_table = _table(
        "queries",
        {
            "query_id": [q[0] for q in queries],
            "person_id": [q[1] for q in queries],
            "image_id": [q[2] for q in queries],
            **{
                c: [float(q[3][i]) for q in queries] for i, c in enumerate(("x1", "y1", "x2", "y2"))
            },
            "occluded": [bool(rng.random() < 0.5) for _ in queries],
            "low_resolution": [bool(rng.random() < 0.5) for _ in queries],
        },
    )
    gallery_table = _table(
        "galleries",
        {
            "gallery_size": [g[0] for g in galleries],
            "query_id": [g[1] for g in galleries],
            "image_id": [g[2] for g in galleries],
            **{
                f"gt_{c}": [None if g[3] is None else float(g[3][i]) for g in galleries]
                for i, c in enumerate(("x1", "y1", "x2", "y2"))
            },
        },
    )
    manifests = Manifests(Path("memory"), images, boxes, persons, query_table, gallery_table, {})

    det_rows = []  # (image, box, score)
    test_boxes = [r for r in box_rows if r[0] < n_test]
    for image in range(n_test):
        if rng.random() < 0.15:
            continue  # a gallery image with nothing detected
        here = [r[1] for r in test_boxes if r[0] == image]
        for gt in here:
            for _ in range(int(rng.integers(0, 3))):
                other = here[int(rng.integers(len(here)))]
                det_rows.append((image, np.asarray(_near(rng, gt, other), np.float32), None))
        for _ in range(int(rng.integers(0, 3))):
            det_rows.append((image, _person_box(rng), None))
    if not det_rows:
        det_rows.append((0, _person_box(rng), None))
    scores = rng.choice([0.5, 0.01, 0.3], size=len(det_rows)) if rng.random() < 0.3 else None
    scores = rng.uniform(0, 1, len(det_rows)) if scores is None else scores
    make = _lattice_features if lattice else _random_features
    feats = make(rng, len(det_rows))
    dup = rng.random(len(det_rows)) < 0.2
    feats[dup] = feats[rng.integers(len(det_rows), size=int(dup.sum()))]
    qfeats = make(rng, len(queries))
    copy = rng.random(len(queries)) < 0.3
    qfeats[copy] = feats[rng.integers(len(det_rows), size=int(copy.sum()))]
    dets = pa.table(
        [
            pa.array([r[0] for r in det_rows], pa.int32()),
            *[pa.array([float(r[1][i]) for r in det_rows], pa.float32()) for i in range(4)],
            pa.array(scores, pa.float32()),
            pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), DIM),
        ],
        names=["image_id", "x1", "y1", "x2", "y2", "score", "feature"],
    )
    query_feats = pa.table(
        [
            pa.array([q[0] for q in queries], pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(qfeats.ravel()), DIM),
        ],
        names=["query_id", "feature"],
    )
    return manifests, dets, query_feats


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    lattice=st.booleans(),
    cross_camera=st.booleans(),
    det_thresh=st.sampled_from([0.5, 0.3, 0.0]),
)
def test_search_matches_reference(seed, lattice, cross_camera, det_thresh):
    manifests, dets, qfeats = random_case(seed, lattice)
    data = build_eval_data(manifests, dets, qfeats)
    cfg = EvaluateConfig(det_thresh=det_thresh, cross_camera=cross_camera)
    _, protocols, scores = score_search(data, manifests.galleries, cfg, SIZES)
    for protocol in protocols:
        expected = reference_search(
            manifests.images,
            manifests.queries,
            manifests.galleries,
            dets,
            qfeats,
            protocol.size,
            det_thresh,
            cross_camera,
        )
        got = scores[protocol.size]
        rows = protocol.queries
        assert sorted(int(q) for q in data.query_ids[rows]) == sorted(expected)
        for row in rows:
            ap, rank, count_gt, count_tp = expected[int(data.query_ids[row])]
            where = f"{protocol.name} query {int(data.query_ids[row])}"
            assert got.ap[row] == pytest.approx(ap, abs=1e-9), where
            assert (got.rank[row], got.count_gt[row], got.count_tp[row]) == (
                rank,
                count_gt,
                count_tp,
            ), where


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), det_eval_thresh=st.sampled_from([0.01, 0.3, 0.5]))
def test_detection_matches_reference(seed, det_eval_thresh):
    manifests, dets, qfeats = random_case(seed, lattice=False)
    data = build_eval_data(manifests, dets, qfeats)
    got, curve = detection_metrics(data, det_eval_thresh)
    expected = reference_detection(manifests.images, manifests.boxes, dets, det_eval_thresh)
    for key in ("ap", "recall", "labeled_recall"):
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    if len(curve.recall):
        assert curve.recall[-1] == pytest.approx(got["recall"], abs=1e-12)
        assert np.all(np.diff(curve.recall) >= 0)


@settings(max_examples=100, deadline=None)
@given(
    labels=st.lists(st.booleans(), min_size=1, max_size=30),
    data=st.data(),
)
def test_average_precision_is_sklearns(labels, data):
    from sklearn.metrics import average_precision_score

    scores = data.draw(
        st.lists(
            st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=len(labels), max_size=len(labels)
        )
    )
    ours = average_precision(np.array(labels), np.array(scores))
    expected = average_precision_score(labels, scores) if any(labels) else 0.0
    assert ours == pytest.approx(expected, abs=1e-12)
