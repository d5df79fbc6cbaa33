"""Person search metrics (the CUHK-SYSU protocol, as docs/contract.md defines it), vectorised.

For a block of queries at once: similarities to every candidate are one matrix
product; each gallery image's one positive is the most similar candidate that
passes the IoU rule (a grouped arg-max over precomputed (gt, candidate) pairs);
and scikit-learn's average precision is computed from counts alone:

    AP * count_tp / count_gt = sum over positives p of  TP(>= s_p) / N(>= s_p)  / count_gt

where N(>= s) is the number of the query's candidates with similarity >= s and
TP(>= s) the number of its positives there (ties count together, as sklearn's
distinct thresholds do). Both counts come from one `searchsorted` of the block's
candidates against its positives' similarities.

Ties in similarity between a positive and negatives are ranked pessimistically
for top-k and the rank of the first match (negatives first).

With CBGM (psearch.evaluation.cbgm) each protocol scores its own revised copy of the
block's similarities; everything after that is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from psearch.errors import PsearchError
from psearch.evaluation.boxes import iou_pairs, search_iou_threshold
from psearch.evaluation.cbgm import ContextReranker
from psearch.evaluation.inputs import EvalData, column_numpy, column_valid

WHOLE_SET = -1  # gallery_size of the whole-test-set protocol
QUERY_BLOCK = 128  # queries per matrix product: bounds memory at ~QUERY_BLOCK x candidates


@dataclass
class Protocol:
    """One gallery protocol, as arrays of query rows (positions in EvalData.query_ids)."""

    size: int
    queries: np.ndarray  # query rows scored under this protocol
    member_query: np.ndarray | None  # (R,) sorted; None = every test image is in the gallery
    member_image: np.ndarray | None  # (R,) test image index
    gt_query: np.ndarray  # (P,) sorted: one row per gallery image that contains the person
    gt_image: np.ndarray  # (P,)
    gt_boxes: np.ndarray  # (P, 4) float64

    @property
    def name(self) -> str:
        return f"gallery_{self.size}"


@dataclass
class QueryScores:
    """Per query row (all rows of EvalData; only Protocol.queries are meaningful)."""

    ap: np.ndarray  # float64
    rank: np.ndarray  # 1-based rank of the first correct candidate, 0 when none
    count_gt: np.ndarray
    count_tp: np.ndarray
    positive: np.ndarray  # per Protocol gt row: the detection index of its positive, -1 if none

    @staticmethod
    def summary_empty() -> dict:
        return {"mAP": 0.0, "top1": 0.0, "top5": 0.0, "top10": 0.0, "queries": 0}

    def summary(self, rows: np.ndarray) -> dict:
        """mAP and top-1/5/10 over the given query rows (zeros when there are none)."""
        out = {"mAP": float(self.ap[rows].mean()) if len(rows) else 0.0}
        for k in (1, 5, 10):
            hit = (self.rank[rows] >= 1) & (self.rank[rows] <= k)
            out[f"top{k}"] = float(hit.mean()) if len(rows) else 0.0
        out["queries"] = int(len(rows))
        return out


def available_sizes(galleries: pa.Table) -> list[int]:
    """Gallery sizes in the manifests: ascending, the whole-set protocol (-1) last."""
    values = column_numpy(galleries, "gallery_size")
    if len(values) == 0:
        return []
    low = int(values.min())
    # A histogram, not np.unique: ~20M rows but only a handful of distinct small values.
    sizes = (np.flatnonzero(np.bincount(values - low)) + low).tolist()
    return [s for s in sizes if s != WHOLE_SET] + [s for s in sizes if s == WHOLE_SET]


def build_protocols(
    data: EvalData,
    galleries: pa.Table,
    sizes: list[int],
    cameras: tuple[np.ndarray, np.ndarray] | None = None,
    where: str = "galleries.parquet",
) -> list[Protocol]:
    """Protocols for `sizes` from galleries.parquet: own image dropped, other cameras only
    when `cameras` (test images', queries') is given."""
    size_of = column_numpy(galleries, "gallery_size")
    wanted = np.isin(size_of, sizes)
    wanted = slice(None) if wanted.all() else wanted  # no copies of ~20M rows when all wanted
    size_of = size_of[wanted]
    all_qrow = data.query_index(column_numpy(galleries, "query_id")[wanted], where)
    all_image = data.test_index(column_numpy(galleries, "image_id")[wanted], where)
    # Raw values (no NaN-filled copies of ~20M rows); only rows with a gt box are read.
    gt_columns = [column_numpy(galleries, f"gt_{c}", False) for c in ("x1", "y1", "x2", "y2")]
    gt_columns = [column[wanted] for column in gt_columns]
    all_gt = column_valid(galleries, "gt_x1")[wanted]
    protocols = []
    for size in sizes:
        rows = np.flatnonzero(size_of == size)
        if (np.diff(all_qrow[rows]) < 0).any():  # manifests list a query's rows together
            rows = rows[np.argsort(all_qrow[rows], kind="stable")]
        qrow, image = all_qrow[rows], all_image[rows]
        keep = image != data.query_image[qrow]
        if cameras is not None:
            image_cams, query_cams = cameras
            keep &= image_cams[image] != query_cams[qrow]
        gt = keep & all_gt[rows]
        if size == WHOLE_SET:  # sized protocols are checked block by block in image_members
            _refuse_duplicates(data, qrow[gt], image[gt], size)
        gt_boxes = np.stack([column[rows[gt]] for column in gt_columns], axis=1)
        whole = size == WHOLE_SET
        protocols.append(
            Protocol(
                size=size,
                queries=np.arange(len(data.query_ids)) if whole else _distinct_sorted(qrow),
                member_query=None if whole else qrow[keep],
                member_image=None if whole else image[keep],
                gt_query=qrow[gt],
                gt_image=image[gt],
                gt_boxes=gt_boxes.astype(np.float64).reshape(-1, 4),
            )
        )
    return protocols


def _distinct_sorted(values: np.ndarray) -> np.ndarray:
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _refuse_duplicates(data: EvalData, qrow: np.ndarray, image: np.ndarray, size: int) -> None:
    _, first, counts = np.unique(
        qrow * len(data.image_ids) + image, return_index=True, return_counts=True
    )
    if (counts > 1).any():
        i = first[np.argmax(counts > 1)]
        raise PsearchError(
            f"galleries.parquet: image_id {int(data.image_ids[image[i]])} is listed twice for "
            f"query_id {int(data.query_ids[qrow[i]])} (gallery_size {size})"
        )


def order_key(values: np.ndarray) -> np.ndarray:
    """int64 keys that sort, and compare equal, exactly as the float32 values do."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


class SearchScorer:
    """Scores every protocol over blocks of queries (one similarity matrix per block)."""

    def __init__(self, data: EvalData, det_thresh: float, cameras=None, cbgm: bool = False):
        self.data = data
        dets = data.detections
        self.candidates = np.flatnonzero(dets.scores >= det_thresh)  # detection indices
        self.cand_image = dets.image[self.candidates]
        self.cand_boxes = dets.boxes[self.candidates].astype(np.float64)
        # float64 products rounded to float32: identical features give identical similarities.
        self.gallery = dets.features[self.candidates].astype(np.float64)
        self.image_ptr = np.searchsorted(self.cand_image, np.arange(len(data.image_ids) + 1))
        self.cameras = cameras
        self.reranker = (
            ContextReranker(data, self.candidates, self.image_ptr, self.gallery) if cbgm else None
        )

    def similarities(self, rows: slice | np.ndarray) -> np.ndarray:
        query = self.data.query_features[rows].astype(np.float64)
        return (query @ self.gallery.T).astype(np.float32)

    def protocol_similarities(self, p: Protocol, q0: int, q1: int, sims, best):
        """(similarities, image maxima) of the block as protocol `p` scores them: CBGM-revised
        when on."""
        if self.reranker is None:
            return sims, best
        return self.reranker.revise(sims, best, self.image_members(p, q0, q1), q0)

    def expand(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `image`, candidate) for every candidate of every listed image."""
        ptr = self.image_ptr
        counts = ptr[image + 1] - ptr[image]
        position = np.repeat(np.arange(len(counts)), counts)
        starts = np.repeat(ptr[image] - np.cumsum(counts) + counts, counts)
        return position, starts + np.arange(len(position))

    def image_max(self, sims: np.ndarray) -> np.ndarray:
        """(block, test images): each image's highest candidate similarity (-inf if none)."""
        best = np.full((sims.shape[0], len(self.data.image_ids)), -np.inf, dtype=np.float32)
        starts = self.image_ptr[:-1]
        filled = np.flatnonzero(self.image_ptr[1:] > starts)
        if len(filled):
            best[:, filled] = np.maximum.reduceat(sims, starts[filled], axis=1)
        return best

    def _at_least(self, p: Protocol, q0: int, q1: int, sims, best, lowest):
        """(block row, similarity) of the gallery candidates at or above their row's `lowest`.
        Images whose best candidate is below it are skipped whole."""
        if p.member_query is None:
            rows, image = np.nonzero(self.image_members(p, q0, q1) & (best >= lowest[:, None]))
        else:
            self.image_members(p, q0, q1)  # refuses a gallery image listed twice for a query
            r0, r1 = np.searchsorted(p.member_query, [q0, q1])
            rows, image = p.member_query[r0:r1] - q0, p.member_image[r0:r1]
            useful = best[rows, image] >= lowest[rows]
            rows, image = rows[useful], image[useful]
        position, cand = self.expand(image)
        rows = rows[position]
        values = sims[rows, cand]
        keep = values >= lowest[rows]
        return rows[keep], values[keep]

    def eligible(self, protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
        """(gt row, candidate) pairs passing the IoU rule, grouped by gt row."""
        gt_row, cand = self.expand(protocol.gt_image)
        iou = iou_pairs(protocol.gt_boxes[gt_row], self.cand_boxes[cand])
        ok = iou >= search_iou_threshold(protocol.gt_boxes)[gt_row]
        return gt_row[ok], cand[ok]

    def image_members(self, protocol: Protocol, q0: int, q1: int) -> np.ndarray:
        """(block, test images) bool: which images are in each query's gallery."""
        n_images = len(self.data.image_ids)
        if protocol.member_query is None:
            member = np.ones((q1 - q0, n_images), dtype=bool)
            own = self.data.query_image[q0:q1]
            has = np.flatnonzero(own >= 0)
            member[has, own[has]] = False
            if self.cameras is not None:
                image_cams, query_cams = self.cameras
                member &= image_cams[None, :] != query_cams[q0:q1, None]
            return member
        r0, r1 = np.searchsorted(protocol.member_query, [q0, q1])
        member = np.zeros((q1 - q0, n_images), dtype=bool)
        qrow, image = protocol.member_query[r0:r1], protocol.member_image[r0:r1]
        member[qrow - q0, image] = True
        if member.sum() != r1 - r0:  # cheaper here, per block, than a sort of every row
            _refuse_duplicates(self.data, qrow, image, protocol.size)
        return member

    def score(self, protocols: list[Protocol], block: int = QUERY_BLOCK) -> dict[int, QueryScores]:
        n = len(self.data.query_ids)
        results = {
            p.size: QueryScores(
                ap=np.zeros(n),
                rank=np.zeros(n, dtype=np.int64),
                count_gt=np.zeros(n, dtype=np.int64),
                count_tp=np.zeros(n, dtype=np.int64),
                positive=np.full(len(p.gt_query), -1, dtype=np.int64),
            )
            for p in protocols
        }
        eligible = {p.size: self.eligible(p) for p in protocols}
        for q0 in range(0, n, block):
            q1 = min(n, q0 + block)
            sims = self.similarities(slice(q0, q1))
            best = self.image_max(sims)
            for p in protocols:
                revised, top = self.protocol_similarities(p, q0, q1, sims, best)
                self._score_block(p, eligible[p.size], revised, top, q0, q1, results[p.size])
        return results

    def _score_block(self, p, eligible, sims, best, q0, q1, out: QueryScores) -> None:
        nb = q1 - q0
        a0, a1 = np.searchsorted(p.gt_query, [q0, q1])
        out.count_gt[q0:q1] = np.bincount(p.gt_query[a0:a1] - q0, minlength=nb)

        # Each gt image's positive: its most similar candidate that passes the IoU rule.
        el_gt, el_cand = eligible
        e0, e1 = np.searchsorted(el_gt, [a0, a1])
        el_gt, el_cand = el_gt[e0:e1], el_cand[e0:e1]
        el_sim = sims[p.gt_query[el_gt] - q0, el_cand]
        order = np.lexsort((el_cand, -el_sim, el_gt))
        first = order[np.r_[True, el_gt[order][1:] != el_gt[order][:-1]]] if len(order) else order
        out.positive[el_gt[first]] = self.candidates[el_cand[first]]
        pos_row = p.gt_query[el_gt[first]] - q0  # ascending
        pos_sim = el_sim[first]
        count_tp = np.bincount(pos_row, minlength=nb)
        out.count_tp[q0:q1] = count_tp
        if len(pos_row) == 0:
            return

        # Positives' similarities as thresholds, sorted within rows; rows kept apart by offsets.
        thresholds = order_key(pos_sim) + (pos_row.astype(np.int64) << 32)
        t_order = np.argsort(thresholds, kind="stable")
        thresholds, t_row, t_sim = thresholds[t_order], pos_row[t_order], pos_sim[t_order]
        row_end = np.cumsum(count_tp)
        has = count_tp > 0
        lowest = np.full(nb, np.inf, dtype=np.float32)
        lowest[has] = t_sim[(row_end - count_tp)[has]]

        # Only gallery candidates at or above their row's lowest positive can count.
        cand_row, cand_sim = self._at_least(p, q0, q1, sims, best, lowest)
        per_row = np.bincount(cand_row, minlength=nb)
        cand_keys = order_key(cand_sim) + (cand_row.astype(np.int64) << 32)
        below = np.searchsorted(thresholds, cand_keys, side="right")  # thresholds <= candidate
        at_least = np.bincount(below, minlength=len(thresholds) + 1)[::-1].cumsum()[::-1]
        later_rows = per_row.sum() - np.cumsum(per_row)
        n_ge = at_least[1:] - later_rows[t_row]  # candidates with similarity >= threshold j
        tp_ge = row_end[t_row] - np.searchsorted(thresholds, thresholds, side="left")
        precision = tp_ge / n_ge
        ap_sum = np.bincount(t_row, weights=precision, minlength=nb)
        out.ap[q0:q1] = np.where(has, ap_sum / np.maximum(out.count_gt[q0:q1], 1), 0.0)
        top = row_end[has] - 1  # each row's most similar positive
        rank = np.zeros(nb, dtype=np.int64)
        rank[has] = n_ge[top] - tp_ge[top] + 1
        out.rank[q0:q1] = rank

    def ranked_candidates(self, p: Protocol, scores: QueryScores, row: int, k: int = 10):
        """The k most similar candidates of one query's gallery: (detection, similarity, correct)."""
        member = self.image_members(p, row, row + 1)[0]
        idx = np.flatnonzero(member[self.cand_image])
        sims = self.similarities(slice(row, row + 1))
        sims = self.protocol_similarities(p, row, row + 1, sims, self.image_max(sims))[0][0, idx]
        g0, g1 = np.searchsorted(p.gt_query, [row, row + 1])
        correct = np.isin(self.candidates[idx], scores.positive[g0:g1])
        order = np.lexsort((correct, -sims))[:k]
        return [(int(self.candidates[idx[i]]), float(sims[i]), bool(correct[i])) for i in order]
