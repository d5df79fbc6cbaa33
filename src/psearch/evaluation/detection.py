"""Detection metrics (docs/contract.md "Detection"): AP, recall and labelled recall, vectorised.

A detection and a gt box of the same image match when each is the other's
highest-IoU partner (IoU stored as float32, ties to the lower index, as the
field's evaluator does) and their IoU is at least 0.5. All (gt, detection)
pairs of all images are built at once and the two arg-maxes are grouped sorts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psearch.evaluation.boxes import iou_pairs
from psearch.evaluation.inputs import EvalData

MATCH_IOU = 0.5


@dataclass
class PRCurve:
    """Precision and recall (over all gt boxes) at each distinct score threshold, descending."""

    thresholds: np.ndarray
    recall: np.ndarray
    precision: np.ndarray


def _ranked(y_true: np.ndarray, y_score: np.ndarray):
    """True positives and detections counted at each distinct score, highest score first."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    score, hit = y_score[order], y_true[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    return score[last], np.cumsum(hit)[last], last + 1.0


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """scikit-learn's average_precision_score (0 when there is no positive)."""
    y_true, y_score = np.asarray(y_true, bool), np.asarray(y_score)
    if not y_true.any():
        return 0.0
    _, tps, seen = _ranked(y_true, y_score)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * (tps / seen)))


def match(gt_image, gt_boxes, det_image, det_boxes, n_images: int) -> np.ndarray:
    """Which detections match a gt box (mutual best IoU >= 0.5). Inputs grouped by image."""
    det_count = np.bincount(det_image, minlength=n_images)
    det_start = np.cumsum(det_count) - det_count
    per_gt = det_count[gt_image]
    pair_gt = np.repeat(np.arange(len(gt_image)), per_gt)
    offsets = np.arange(len(pair_gt)) - np.repeat(np.cumsum(per_gt) - per_gt, per_gt)
    pair_det = det_start[gt_image][pair_gt] + offsets
    iou = iou_pairs(gt_boxes[pair_gt], det_boxes[pair_det]).astype(np.float32)
    best_gt = _first_best(pair_det, iou, pair_gt, len(det_image))
    best_det = _first_best(pair_gt, iou, pair_det, len(gt_image))
    ok = (iou >= MATCH_IOU) & (best_gt[pair_det] == pair_gt) & (best_det[pair_gt] == pair_det)
    matched = np.zeros(len(det_image), dtype=bool)
    matched[pair_det[ok]] = True
    return matched


def _first_best(group: np.ndarray, iou: np.ndarray, other: np.ndarray, n: int) -> np.ndarray:
    """For each group id, the `other` id with the highest IoU (lowest id on ties); -1 if none."""
    best = np.full(n, -1, dtype=np.int64)
    if len(group):
        order = np.lexsort((other, -iou, group))
        first = order[np.r_[True, group[order][1:] != group[order][:-1]]]
        best[group[first]] = other[first]
    return best


def detection_metrics(data: EvalData, det_eval_thresh: float) -> tuple[dict, PRCurve]:
    """{"ap", "recall", "labeled_recall"} over the test images, and the PR curve behind "ap"."""
    dets = data.detections
    keep = dets.scores >= det_eval_thresh
    det_image, det_boxes, scores = dets.image[keep], dets.boxes[keep], dets.scores[keep]
    n_images = len(data.image_ids)

    matched = match(data.gt_image, data.gt_boxes, det_image, det_boxes, n_images)
    n_gt = len(data.gt_image)
    recall = matched.sum() / n_gt if n_gt else 0.0
    ap = average_precision(matched, scores) * recall if len(scores) else 0.0
    threshold, tps, seen = _ranked(matched, scores) if len(scores) else (np.empty(0),) * 3
    curve = PRCurve(threshold, tps / max(n_gt, 1), tps / np.maximum(seen, 1))

    # Labelled only: unlabelled people removed; images without a labelled person left out.
    lab = data.gt_labelled
    lab_images = np.zeros(n_images, dtype=bool)
    lab_images[data.gt_image[lab]] = True
    on = lab_images[det_image]
    lab_matched = match(
        data.gt_image[lab], data.gt_boxes[lab], det_image[on], det_boxes[on], n_images
    )
    n_lab = int(lab.sum())
    labeled_recall = lab_matched.sum() / n_lab if n_lab else 0.0
    metrics = {"ap": float(ap), "recall": float(recall), "labeled_recall": float(labeled_recall)}
    return metrics, curve
