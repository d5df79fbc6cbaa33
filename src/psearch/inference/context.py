"""`psearch search --cbgm`: the query image's other people, and psearch.cbgm's re-ranking of
one query's gallery similarities with them.

The query's people come from the gallery's own detections of the query image when the
gallery is an extraction that holds it (its features are then computed as the gallery's
were, joint or IDNet), else from one detector pass over the query image (joint features).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from psearch.cbgm import context_people, rescore


def detect_query_image(query: Path, joint, params, device, thresh: float):
    """(boxes, scores, features) of the query image's detections with score >= thresh."""
    # lazy: torch takes seconds to import; the command line imports this module at start-up
    from psearch.inference import engine

    step = engine.detect_step(joint, params.extract.amp)
    ((_, (boxes, scores, feats)),) = next(engine.run_chunks([query], [None], step, 1, 0, device))
    keep = scores >= thresh
    # not reshape(n, -1): an image without detections gives empty arrays
    feats = feats.reshape(len(scores), joint.feat_dim)
    return boxes.reshape(-1, 4)[keep], scores[keep], feats[keep]


def rerank(sims, image_paths, feats, query_feature, query_box, context) -> tuple[np.ndarray, str]:
    """CBGM-revised similarities of one query over a flat gallery, and a note saying so.
    `context`: (boxes, scores, features) of the query image's detections."""
    boxes, scores, context_feats = context
    people = context_people(query_feature, query_box, boxes, scores, context_feats)
    revised = rescore(np.asarray(sims, np.float64), image_paths, feats, people)
    note = (
        f"note: CBGM re-ranking with {len(people) - 1} other people of the query image "
        "(similarity = query + matched companions)"
    )
    return revised, note
