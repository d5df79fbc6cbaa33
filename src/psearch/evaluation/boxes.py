"""Box geometry shared by the search and detection metrics (float64, pairwise rows)."""

from __future__ import annotations

import numpy as np


def iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] and b[i] for each row i; boxes are x1, y1, x2, y2 (no +1 pixel convention)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    width = np.maximum(0.0, np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]))
    height = np.maximum(0.0, np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]))
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    # Two empty boxes: no overlap rather than NaN.
    return np.where(union > 0, iou, 0.0)


def search_iou_threshold(gt: np.ndarray) -> np.ndarray:
    """min(0.5, w*h / ((w+10)*(h+10))): small people may be matched more loosely."""
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    w, h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    return np.minimum(0.5, (w * h) / ((w + 10.0) * (h + 10.0)))
