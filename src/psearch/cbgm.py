"""Context bipartite graph matching (CBGM): SeqNet's re-ranking rule, shared by
`psearch evaluate --cbgm` (psearch.evaluation.cbgm) and `psearch search --cbgm`.

A person is easier to recognise beside the people they came with. For one query (the
rule SeqNet's `eval_search_cuhk` applies; the values are its CUHK-SYSU ones, k1 =
TOP_DETECTIONS, k2 = CONTEXT_PEOPLE):

1. The query's people (`context_people`): the query box's own feature first, then up to
   CONTEXT_PEOPLE - 1 other people of the query's image: its detections with score >=
   the detection threshold whose IoU with the query box is <= 0.5, highest score first.
   (SeqNet adds the query box to the query image's detections at score 1 and runs NMS at
   0.5, which removes the detections of the query person themself.)
2. The gallery images re-scored (`selected`): those holding the query's TOP_DETECTIONS
   most similar candidates in its gallery, every candidate tied with the last one too.
   Selection uses the plain similarities.
3. In each such image (`match_image`): W[i, j] = person i of the query's image . candidate
   j (cosine), and the maximum-weight assignment (`scipy.optimize.linear_sum_assignment`,
   maximize=True: min(people, candidates) pairs). When the query box is assigned to
   candidate j, the similarity of j becomes the assignment's total weight,
       sim(query, j) + sum of the matched context similarities,
   and every other candidate keeps its plain similarity.

A query with no other person in its image has only itself to match: its best candidate
keeps its similarity, so nothing changes.
"""

from __future__ import annotations

import numpy as np

TOP_DETECTIONS = 10  # SeqNet's k1 (CUHK-SYSU; 30 on PRW)
CONTEXT_PEOPLE = 3  # SeqNet's k2, the query box included (CUHK-SYSU; 4 on PRW)
SAME_PERSON_IOU = 0.5  # a detection overlapping the query box more is the query person


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1, y1, x2, y2 box with each of `boxes` (0 where the union is empty)."""
    box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1])
    union = union + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def context_people(
    query_feature: np.ndarray,
    query_box: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    features: np.ndarray,
    people: int = CONTEXT_PEOPLE,
) -> np.ndarray:
    """Step 1: (n <= people, D) float64 features, the query's first. `boxes`, `scores`,
    `features`: the query image's detections that pass the detection threshold."""
    own = np.asarray(query_feature, np.float64).reshape(1, -1)
    if people <= 1 or len(scores) == 0:
        return own
    others = np.flatnonzero(_iou(query_box, boxes) <= SAME_PERSON_IOU)
    others = others[np.argsort(-np.asarray(scores)[others], kind="stable")[: people - 1]]
    return np.concatenate([own, np.asarray(features, np.float64)[others].reshape(-1, own.shape[1])])


def selected(sims: np.ndarray, top: int = TOP_DETECTIONS) -> np.ndarray:
    """Step 2: which candidates are among the `top` most similar (ties with the last one
    included; -inf marks a candidate outside the gallery)."""
    finite = np.isfinite(sims)
    count = int(finite.sum())
    if top <= 0:
        return np.zeros(len(sims), bool)
    if count <= top:
        return finite
    cut = np.partition(sims[finite], count - top)[count - top]  # the top-th largest
    return sims >= cut


def match_image(people: np.ndarray, features: np.ndarray) -> tuple[int, float] | None:
    """Step 3 for one gallery image: (candidate whose similarity is revised, its new value),
    or None when the query box is left unassigned (fewer candidates than people)."""
    if len(features) == 0:
        return None
    # lazy: scipy.optimize takes ~0.6 s to import; only CBGM needs it
    from scipy.optimize import linear_sum_assignment

    weights = people @ np.asarray(features, np.float64).T
    rows, cols = linear_sum_assignment(weights, maximize=True)
    query = np.flatnonzero(rows == 0)
    if len(query) == 0:
        return None
    return int(cols[query[0]]), float(weights[rows, cols].sum())


def rescore(
    sims: np.ndarray,
    image_of: np.ndarray,
    features: np.ndarray,
    people: np.ndarray,
    top: int = TOP_DETECTIONS,
) -> np.ndarray:
    """Steps 2 and 3 for one query over a flat gallery: `sims` (N,) of its candidates,
    `image_of` (N,) which gallery image each lies in, `features` (N, D). A revised copy."""
    revised = np.array(sims, copy=True)
    chosen = selected(revised, top)
    for image in np.unique(np.asarray(image_of)[chosen]):
        rows = np.flatnonzero(np.asarray(image_of) == image)
        match = match_image(people, features[rows])
        if match is not None:
            revised[rows[match[0]]] = match[1]
    return revised
