"""CBGM in the evaluator: psearch.cbgm's rule applied to blocks of queries, per protocol.

The gallery images re-scored depend on the protocol (the query's TOP_DETECTIONS most
similar candidates among its protocol's gallery images); an image's assignment does not,
so each (query, image) assignment is solved once and shared by every protocol.
The query's people come from its own image's detections in gallery_detections.parquet
(the extraction holds every test image, so the query images too); a query whose image is
not a test image has only itself as context, and CBGM leaves it unchanged.
"""

from __future__ import annotations

import numpy as np

from psearch.cbgm import CONTEXT_PEOPLE, TOP_DETECTIONS, context_people, match_image, selected
from psearch.evaluation.inputs import EvalData


class ContextReranker:
    """Revises a block of query-to-candidate similarities for one protocol's galleries."""

    def __init__(
        self,
        data: EvalData,
        candidates: np.ndarray,
        image_ptr: np.ndarray,
        gallery: np.ndarray,
        top_detections: int = TOP_DETECTIONS,
        people: int = CONTEXT_PEOPLE,
    ):
        self.cand_image = data.detections.image[candidates]
        self.image_ptr = image_ptr
        self.gallery = gallery  # (candidates, D) float64
        self.top_detections = top_detections
        self.people = query_people(data, candidates, image_ptr, gallery, people)
        # (query row, image) -> (candidate, revised similarity) or None; shared by protocols.
        self._matches: dict[tuple[int, int], tuple[int, np.float32] | None] = {}

    def revise(self, sims: np.ndarray, best: np.ndarray, member: np.ndarray, q0: int):
        """(`sims`, `best`) with CBGM applied. `sims` (block, candidates); `best` (block, test
        images): each image's highest similarity; `member` (block, test images): which images
        are in each query's gallery; row r of the block is query row q0 + r."""
        revised, revised_best = sims.copy(), best.copy()
        image_best = np.where(member, best, -np.inf)
        ptr = self.image_ptr
        for r in range(sims.shape[0]):
            # The top candidates all lie in the images with the top maxima (ties included):
            # look at those images' candidates only, not at every candidate of the gallery.
            images = np.flatnonzero(selected(image_best[r], self.top_detections))
            cand = np.concatenate([np.arange(ptr[i], ptr[i + 1]) for i in images] or [[]])
            cand = cand.astype(np.int64)
            chosen = cand[selected(sims[r, cand], self.top_detections)]
            for image in np.unique(self.cand_image[chosen]).tolist():
                match = self._match(q0 + r, image)
                if match is not None:
                    revised[r, match[0]] = match[1]
                    revised_best[r, image] = revised[r, ptr[image] : ptr[image + 1]].max()
        return revised, revised_best

    def _match(self, row: int, image: int) -> tuple[int, np.float32] | None:
        key = (row, image)
        if key not in self._matches:
            c0, c1 = int(self.image_ptr[image]), int(self.image_ptr[image + 1])
            match = match_image(self.people[row], self.gallery[c0:c1])
            self._matches[key] = None if match is None else (c0 + match[0], np.float32(match[1]))
        return self._matches[key]


def query_people(
    data: EvalData,
    candidates: np.ndarray,
    image_ptr: np.ndarray,
    gallery: np.ndarray,
    people: int,
) -> list[np.ndarray]:
    """Per query row, psearch.cbgm's step 1 on its image's candidates: (n, D) float64."""
    dets = data.detections
    out = []
    for row in range(len(data.query_ids)):
        image = int(data.query_image[row])
        cand = np.arange(image_ptr[image], image_ptr[image + 1]) if image >= 0 else np.arange(0)
        det = candidates[cand]
        out.append(
            context_people(
                data.query_features[row],
                data.query_boxes[row],
                dets.boxes[det],
                dets.scores[det],
                gallery[cand],
                people,
            )
        )
    return out
