"""A plain, loop-by-loop evaluator to check psearch.evaluation against (and to benchmark).

It follows docs/contract.md and the field's reference evaluator (SeqNet's
eval_search_cuhk / eval_search_prw / eval_detection) literally: per query, per
gallery image, per candidate, with scikit-learn's average_precision_score.
It shares no code with the vectorised evaluator. Two documented choices:
similarities are float64 dot products rounded to float32 (so identical features
tie exactly), and among equal similarities negatives rank before positives
(top-k and the rank of the first match).

`fake_detections` makes detection files for a set of manifests (tests, benchmark).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
from sklearn.metrics import average_precision_score


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _camera(name: str) -> int:
    return int(re.match(r"^c(\d+)", name).group(1))


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _test_images(images: pa.Table) -> dict[int, str]:
    return {r["image_id"]: r["image_name"] for r in _rows(images) if r["split"] == "test"}


def gallery_candidates(dets: pa.Table, det_thresh: float) -> dict[int, list[tuple]]:
    """{image_id: [(box, feature), ...]} of the detections with score >= det_thresh."""
    by_image: dict[int, list[tuple]] = {}
    for r in _rows(dets):
        if np.float32(r["score"]) >= np.float32(det_thresh):  # float32, as numpy compares them
            box = (float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"]))
            by_image.setdefault(r["image_id"], []).append(
                (box, np.asarray(r["feature"], np.float64))
            )
    return by_image


def reference_search(
    images,
    queries,
    galleries,
    dets,
    query_feats,
    size,
    det_thresh=0.5,
    cross_camera=False,
    only=None,
    candidates=None,
):
    """{query_id: (ap, rank or 0, count_gt, count_tp)} for one gallery protocol
    (restricted to the query ids in `only` when given; `candidates` from
    gallery_candidates(dets, det_thresh) may be passed in to save rebuilding them)."""
    test = _test_images(images)
    names = {r["image_id"]: r["image_name"] for r in _rows(images)}
    cands = gallery_candidates(dets, det_thresh) if candidates is None else candidates
    qfeat = {r["query_id"]: np.asarray(r["feature"], np.float64) for r in _rows(query_feats)}
    rows_of: dict[int, list[dict]] = {}
    for r in _rows(galleries):
        if r["gallery_size"] == size:
            rows_of.setdefault(r["query_id"], []).append(r)
    results = {}
    for q in _rows(queries):
        qid, own = q["query_id"], q["image_id"]
        if only is not None and qid not in only:
            continue
        if size != -1 and qid not in rows_of:
            continue
        gts = {r["image_id"]: r for r in rows_of.get(qid, []) if r["gt_x1"] is not None}
        if size == -1:
            gallery = [i for i in test if i != own]
        else:
            gallery = [r["image_id"] for r in rows_of[qid] if r["image_id"] != own]
        if cross_camera:
            gallery = [i for i in gallery if _camera(names[i]) != _camera(names[own])]
        y_true, y_score = [], []
        count_gt = count_tp = 0
        for image in gallery:
            gt = gts.get(image)
            count_gt += gt is not None
            found = cands.get(image, [])
            sims = [np.float32(np.dot(feat, qfeat[qid])) for _, feat in found]
            labels = [0] * len(found)
            if gt is not None:
                gt_box = (
                    float(gt["gt_x1"]),
                    float(gt["gt_y1"]),
                    float(gt["gt_x2"]),
                    float(gt["gt_y2"]),
                )
                w, h = gt_box[2] - gt_box[0], gt_box[3] - gt_box[1]
                thresh = min(0.5, (w * h) / ((w + 10) * (h + 10)))
                for j in sorted(range(len(found)), key=lambda j: -sims[j]):
                    if _iou(found[j][0], gt_box) >= thresh:
                        labels[j] = 1
                        count_tp += 1
                        break
            y_true += labels
            y_score += sims
        ap = 0.0
        if count_tp:
            ap = average_precision_score(y_true, y_score) * count_tp / count_gt
        ranked = sorted(zip(y_score, y_true, strict=True), key=lambda t: (-t[0], t[1]))
        rank = next((i + 1 for i, (_, label) in enumerate(ranked) if label), 0)
        results[qid] = (float(ap), rank, count_gt, count_tp)
    return results


def _match_image(gt_boxes, det_boxes) -> tuple[list[bool], int]:
    ious = np.zeros((len(gt_boxes), len(det_boxes)), dtype=np.float32)
    for i, g in enumerate(gt_boxes):
        for j, d in enumerate(det_boxes):
            ious[i, j] = _iou(g, d)
    tf = ious >= 0.5
    for j in range(len(det_boxes)):
        best = int(np.argmax(ious[:, j])) if len(gt_boxes) else -1
        for i in range(len(gt_boxes)):
            if i != best:
                tf[i, j] = False
    for i in range(len(gt_boxes)):
        best = int(np.argmax(ious[i, :])) if len(det_boxes) else -1
        for j in range(len(det_boxes)):
            if j != best:
                tf[i, j] = False
    return [bool(tf[:, j].any()) for j in range(len(det_boxes))], int(tf.sum())


def reference_detection(images, boxes, dets, det_eval_thresh=0.01) -> dict:
    test = _test_images(images)
    gt_of: dict[int, list] = {i: [] for i in test}
    for r in _rows(boxes):
        if r["image_id"] in gt_of:
            gt_of[r["image_id"]].append(((r["x1"], r["y1"], r["x2"], r["y2"]), r["person_id"] >= 0))
    det_of: dict[int, list] = {i: [] for i in test}
    for r in _rows(dets):
        if np.float32(r["score"]) >= np.float32(det_eval_thresh):
            det_of[r["image_id"]].append(((r["x1"], r["y1"], r["x2"], r["y2"]), r["score"]))
    out = {}
    for labeled in (False, True):
        y_true, y_score, count_gt, count_tp = [], [], 0, 0
        for image in test:
            gt = [b for b, lab in gt_of[image] if lab or not labeled]
            if labeled and not gt:
                continue
            det = det_of[image]
            hits, tp = _match_image(gt, [b for b, _ in det])
            y_true += hits
            y_score += [s for _, s in det]
            count_gt += len(gt)
            count_tp += tp
        recall = count_tp / count_gt if count_gt else 0.0
        if labeled:
            out["labeled_recall"] = recall
        else:
            out["recall"] = recall
            out["ap"] = average_precision_score(y_true, y_score) * recall if count_tp else 0.0
    return out


def fake_detections(images, boxes, queries, rng, dim=16, per_image=6, noise=0.6):
    """Plausible detections for the test images: jittered gt boxes plus clutter.

    Each person gets an identity direction; a detection's feature is its person's
    direction plus noise, so search is neither perfect nor random.
    """
    test = np.array([r["image_id"] for r in _rows(images) if r["split"] == "test"])
    n_persons = max([r["person_id"] for r in _rows(boxes)] + [0]) + 1
    identity = rng.normal(size=(n_persons + 1, dim))
    by_image: dict[int, list] = {}
    for r in _rows(boxes):
        by_image.setdefault(r["image_id"], []).append(r)
    rows = {"image_id": [], "x1": [], "y1": [], "x2": [], "y2": [], "score": [], "feature": []}

    def add(image, box, score, feature):
        feature = feature / np.linalg.norm(feature)
        for key, value in zip(("x1", "y1", "x2", "y2"), box, strict=True):
            rows[key].append(float(value))
        rows["image_id"].append(int(image))
        rows["score"].append(float(score))
        rows["feature"].append(feature.astype(np.float32))

    for image in test:
        persons = by_image.get(int(image), [])
        for r in persons:
            if rng.random() < 0.9:
                w, h = r["x2"] - r["x1"], r["y2"] - r["y1"]
                jitter = rng.normal(scale=0.08, size=4) * [w, h, w, h]
                box = np.array([r["x1"], r["y1"], r["x2"], r["y2"]]) + jitter
                box[2:] = np.maximum(box[2:], box[:2] + 1)
                pid = r["person_id"] if r["person_id"] >= 0 else n_persons
                add(image, box, rng.uniform(0.4, 1.0), identity[pid] + noise * rng.normal(size=dim))
        for _ in range(max(0, per_image - len(persons))):
            x, y = rng.uniform(0, 400, size=2)
            box = (x, y, x + rng.uniform(10, 80), y + rng.uniform(20, 160))
            add(image, box, rng.uniform(0.0, 0.7), rng.normal(size=dim))
    dets = pa.table(
        [
            pa.array(rows["image_id"], pa.int32()),
            *[pa.array(rows[k], pa.float32()) for k in ("x1", "y1", "x2", "y2", "score")],
            pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(rows["feature"]) if rows["feature"] else [], pa.float32()),
                dim,
            ),
        ],
        names=["image_id", "x1", "y1", "x2", "y2", "score", "feature"],
    )
    qrows = _rows(queries)
    qfeat = (
        np.stack([identity[q["person_id"]] + noise * rng.normal(size=dim) for q in qrows])
        if qrows
        else np.zeros((0, dim))
    )
    qfeat = (qfeat / np.linalg.norm(qfeat, axis=1, keepdims=True)).astype(np.float32)
    query_feats = pa.table(
        [
            pa.array([q["query_id"] for q in qrows], pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(qfeat.ravel(), pa.float32()), dim),
        ],
        names=["query_id", "feature"],
    )
    return dets, query_feats
