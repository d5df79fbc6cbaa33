"""`evaluate`: search and detection metrics for one set of detections, written atomically.

OUT/metrics.json       the contract's metrics (docs/contract.md "Metrics")
OUT/per_query.parquet  ap, rank of the first correct match, count_gt, count_tp per protocol
OUT/worst_queries.json the lowest-AP queries on gallery 100 with their top-10 candidates
OUT/plots/             gallery_size, cmc, detection_pr as CSV (+ PNG)
OUT/extraction.json    copied from DETECTIONS/ when present (read by the report command)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from psearch.atomic import atomic_dir, check_writable
from psearch.config import EvaluateConfig
from psearch.data.manifest import GALLERY_DETECTIONS, QUERY_FEATURES, read_manifests
from psearch.errors import PsearchError
from psearch.evaluation.detection import detection_metrics
from psearch.evaluation.inputs import (
    EvalData,
    build_eval_data,
    numpy_arrow,
    read_detections,
    repeated_string,
)
from psearch.evaluation.plots import cmc, write_plots
from psearch.evaluation.search import (
    Protocol,
    QueryScores,
    SearchScorer,
    available_sizes,
    build_protocols,
)

SUBSET_SIZE = 100  # the occlusion and low-resolution subsets are scored on gallery 100
SUBSETS = ("occlusion", "low_resolution")
TOP_CANDIDATES = 10

PER_QUERY_SCHEMA = pa.schema(
    [
        ("query_id", pa.int32()),
        ("protocol", pa.string()),
        ("ap", pa.float64()),
        ("rank", pa.int32()),  # null when no correct match was found
        ("count_gt", pa.int32()),
        ("count_tp", pa.int32()),
    ]
)


def _check_config(cfg: EvaluateConfig, sizes: list[int], where: str) -> list[int]:
    for name in ("det_thresh", "det_eval_thresh"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise PsearchError(f"evaluate.{name}: {value} is not in [0, 1]")
    if cfg.worst_queries < 0:
        raise PsearchError(f"evaluate.worst_queries: {cfg.worst_queries} is negative")
    if cfg.gallery_sizes is None:
        return sizes
    for size in cfg.gallery_sizes:
        if size not in sizes:
            raise PsearchError(
                f"gallery size {size} is not in {where} (it has {', '.join(map(str, sizes))})"
            )
    return [s for s in sizes if s in cfg.gallery_sizes]


def score_search(
    data: EvalData,
    galleries: pa.Table,
    cfg: EvaluateConfig,
    sizes: list[int],
    present: list[int] | None = None,
) -> tuple[SearchScorer, list[Protocol], dict[int, QueryScores]]:
    """Score `sizes` (plus gallery 100 for the subsets when the manifests have it)."""
    present = available_sizes(galleries) if present is None else present
    wanted = sizes + [SUBSET_SIZE] if SUBSET_SIZE not in sizes else sizes
    wanted = [s for s in wanted if s in present]
    cameras = data.cameras() if cfg.cross_camera else None
    protocols = build_protocols(data, galleries, wanted, cameras)
    scorer = SearchScorer(data, cfg.det_thresh, cameras, cfg.cbgm)
    return scorer, protocols, scorer.score(protocols)


def search_metrics(
    data: EvalData, protocols: list[Protocol], scores: dict[int, QueryScores], sizes: list[int]
) -> dict[str, dict]:
    """metrics.json's "search": one entry per requested protocol, then the two subsets."""
    by_size = {p.size: p for p in protocols}
    out = {by_size[s].name: scores[s].summary(by_size[s].queries) for s in sizes}
    subset_masks = {"occlusion": data.occluded, "low_resolution": data.low_resolution}
    for name in SUBSETS:
        if SUBSET_SIZE in by_size:
            rows = by_size[SUBSET_SIZE].queries
            out[name] = scores[SUBSET_SIZE].summary(rows[subset_masks[name][rows]])
        else:
            out[name] = QueryScores.summary_empty()
    return out


def per_query_table(
    data: EvalData, protocols: list[Protocol], scores: dict[int, QueryScores], sizes: list[int]
) -> pa.Table:
    parts = []
    by_size = {p.size: p for p in protocols}
    named = [(by_size[s].name, s, by_size[s].queries) for s in sizes]
    if SUBSET_SIZE in by_size:
        rows = by_size[SUBSET_SIZE].queries
        named += [("occlusion", SUBSET_SIZE, rows[data.occluded[rows]])]
        named += [("low_resolution", SUBSET_SIZE, rows[data.low_resolution[rows]])]
    for name, size, rows in named:
        s = scores[size]
        parts.append(
            pa.table(
                [
                    numpy_arrow(data.query_ids[rows].astype(np.int32)),
                    repeated_string(name, len(rows)),
                    numpy_arrow(s.ap[rows]),
                    numpy_arrow(s.rank[rows].astype(np.int32), null=s.rank[rows] == 0),
                    numpy_arrow(s.count_gt[rows].astype(np.int32)),
                    numpy_arrow(s.count_tp[rows].astype(np.int32)),
                ],
                schema=PER_QUERY_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else PER_QUERY_SCHEMA.empty_table()


def worst_queries(
    data: EvalData, scorer: SearchScorer, protocol: Protocol, scores: QueryScores, n: int
) -> dict[str, Any]:
    """The n lowest-AP queries of `protocol`, each with its most similar candidates."""
    rows = protocol.queries
    worst = rows[np.argsort(scores.ap[rows], kind="stable")[:n]]
    dets = data.detections
    entries = []
    for row in worst:
        query_box = [float(v) for v in data.query_boxes[row]]
        ranked = scorer.ranked_candidates(protocol, scores, int(row), TOP_CANDIDATES)
        entries.append(
            {
                "query_id": int(data.query_ids[row]),
                "query_image": data.query_image_names[row],
                "query_box": query_box,
                "ap": float(scores.ap[row]),
                "rank": int(scores.rank[row]) or None,
                "count_gt": int(scores.count_gt[row]),
                "count_tp": int(scores.count_tp[row]),
                "top": [
                    {
                        "image": data.image_names[dets.image[det]],
                        "box": [float(v) for v in dets.boxes[det]],
                        "similarity": sim,
                        "correct": correct,
                    }
                    for det, sim, correct in ranked
                ],
            }
        )
    return {"protocol": protocol.name, "queries": entries}


def evaluate(manifests: Path, detections: Path, out: Path, cfg: EvaluateConfig) -> dict[str, Any]:
    """Score `detections` against every protocol of `manifests`; write the results to `out`."""
    manifests, detections, out = Path(manifests), Path(detections), Path(out)
    tables = read_manifests(manifests)
    present = available_sizes(tables.galleries)
    sizes = _check_config(cfg, present, manifests / "galleries.parquet")
    if not sizes:
        raise PsearchError(f"{manifests / 'galleries.parquet'}: no gallery protocol to score")
    dets, query_feats = read_detections(detections)
    data = build_eval_data(
        tables, dets, query_feats, detections / GALLERY_DETECTIONS, detections / QUERY_FEATURES
    )
    check_writable(out)  # the inputs are sound: fail on the output before scoring

    scorer, protocols, scores = score_search(data, tables.galleries, cfg, sizes, present)
    det, pr = detection_metrics(data, cfg.det_eval_thresh)
    metrics = {"search": search_metrics(data, protocols, scores, sizes), "detection": det}

    by_size = {p.size: p for p in protocols}
    focus = by_size[SUBSET_SIZE] if SUBSET_SIZE in sizes else by_size[sizes[0]]
    gallery = [(s, metrics["search"][by_size[s].name]) for s in sizes]
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        pq.write_table(per_query_table(data, protocols, scores, sizes), tmp / "per_query.parquet")
        worst = worst_queries(data, scorer, focus, scores[focus.size], cfg.worst_queries)
        (tmp / "worst_queries.json").write_text(json.dumps(worst, indent=2) + "\n")
        ranks = scores[focus.size].rank[focus.queries]
        write_plots(tmp / "plots", gallery, focus.name, cmc(ranks), pr, det["ap"], png=cfg.plots)
        extraction = detections / "extraction.json"
        if extraction.is_file():
            shutil.copyfile(extraction, tmp / "extraction.json")
    return metrics
