"""`psearch extract`: gallery detections + features and query features for a model.

One forward pass per test image gives its boxes, scores and re-id features; each query's
feature comes from its given box (the joint net's `query_features`). Two baselines of the
paper's Table 2 are flags: `boxes="gt"` uses the annotated boxes as a perfect detector (score
1, features of those boxes), `features="idnet"` takes re-id features from a separately trained
IDNet on crops of the boxes (Deep + IDNet, the two-stage pipeline).

Outputs (docs/contract.md): OUT/gallery_detections.parquet, OUT/query_features.parquet and
OUT/extraction.json (settings, counts, where the images are; the throughput goes to MLflow). With a shard I/N,
the same files go to OUT/part-00I-of-00N/ instead (see shards.py); `merge` combines them.
With tracking on, an extraction is an MLflow stage run: the test split as its dataset
input, the machine's use sampled (system metrics) and its throughput as `extract/...`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from psearch.atomic import atomic_dir, check_writable
from psearch.config import Params
from psearch.data.loaders import dataset_root
from psearch.data.manifest import GALLERY_DETECTIONS, QUERY_FEATURES, Manifests, read_manifests
from psearch.diskspace import SMALL, check_free_space
from psearch.errors import PsearchError
from psearch.inference import engine
from psearch.inference.engine import batch_keys, run_chunks
from psearch.inference.loading import inference_settings, load_idnet, load_joint, resolve_device
from psearch.inference.shards import merge, part_dir, shard_positions
from psearch.inference.writer import (
    GalleryWriter,
    read_extraction_json,
    relative_path,
    write_extraction_json,
    write_query_features,
)
from psearch.tracking import data_version, stage_metrics, stage_run

__all__ = ["extract", "merge"]

BOXES_MODES = ("detect", "gt")
FEATURES_MODES = ("joint", "idnet")


def extract(
    manifests: Path,
    model: str,
    out: Path,
    params: Params,
    shard: tuple[int, int] | None = None,
    boxes: str = "detect",
    features: str = "joint",
    idnet: Path | None = None,
) -> dict[str, Any]:
    """Write the extraction files for the test split of `manifests` (or one shard of it)."""
    _check_modes(boxes, features, idnet)
    if params.extract.batch_size < 1 or params.extract.num_workers < 0:
        raise PsearchError(
            f"extract.batch_size {params.extract.batch_size} / extract.num_workers "
            f"{params.extract.num_workers}: need batch_size >= 1 and num_workers >= 0"
        )
    manifests = Path(manifests)
    tables = read_manifests(manifests)
    gallery = _gallery_images(tables)
    query_images = _query_images(tables)
    settings = {
        "boxes": boxes,
        "features": features,
        "model": str(model),
        "idnet": str(idnet) if idnet else None,
        "data_version": data_version(manifests),
        "model_settings": inference_settings(params.model),
        "shard": list(shard) if shard else None,
    }
    target = part_dir(out, shard) if shard else Path(out)
    if shard and _finished(target, settings):
        return {**read_extraction_json(target), "out": str(target), "skipped": True}
    check_writable(target)  # before the model is loaded and the images are read

    detail = f"{boxes}+{features}" + (f" · part {shard[0]}/{shard[1]}" if shard else "")
    tracking = stage_run(
        "extract", params, manifests, split="test", system_metrics=True, name_detail=detail
    )
    with tracking as tracked:
        info = _extract(tables, gallery, query_images, model, idnet, params, settings, target)
        if tracked is not None:
            _log_throughput(info)
    return {**info, "out": str(target), "skipped": False}


def _log_throughput(info: dict[str, Any]) -> None:
    import mlflow  # lazy: seconds to import; only a tracked extraction needs it

    keys = ("images", "queries", "detections", "seconds", "images_per_s", "query_seconds")
    numbers = {k: float(info[k]) for k in keys if isinstance(info.get(k), (int, float))}
    mlflow.log_metrics(stage_metrics("extract", numbers))


def _extract(
    tables: Manifests,
    gallery: dict[str, list],
    query_images: dict[str, list],
    model: str,
    idnet: Path | None,
    params: Params,
    settings: dict[str, Any],
    target: Path,
) -> dict[str, Any]:
    """The two passes (gallery, queries) into `target`; returns extraction.json's content."""
    boxes, features = settings["boxes"], settings["features"]
    shard = tuple(settings["shard"]) if settings["shard"] else None
    device = resolve_device(params.extract.device)
    passes = _Passes(model, idnet, params, device, boxes, features)
    check_free_space({target: _space_needed(gallery, query_images, passes.dim, params, boxes)})
    started = time.perf_counter()
    with atomic_dir(target) as tmp:
        mine = shard_positions(len(gallery["image_id"]), shard)
        detections = passes.gallery(_select(gallery, mine), tmp / GALLERY_DETECTIONS)
        gallery_seconds = time.perf_counter() - started
        mine_q = shard_positions(len(query_images["image_id"]), shard)
        queries = passes.queries(_select(query_images, mine_q), tmp / QUERY_FEATURES)
        info = {
            **settings,
            "feat_dim": passes.dim,
            "images": len(mine),
            "queries": queries,
            "detections": detections,
            "seconds": round(gallery_seconds, 3),
            "images_per_s": round(len(mine) / gallery_seconds, 3) if gallery_seconds else None,
            "query_seconds": round(time.perf_counter() - started - gallery_seconds, 3),
            "device": str(device),
            "batch_size": params.extract.batch_size,
            "amp": bool(params.extract.amp and device.type == "cuda"),
            # Where the images are, for `psearch search` on this directory (relative to it).
            "manifests": relative_path(tables.root, target),
            "image_root": relative_path(dataset_root(tables), target),
        }
        write_extraction_json(tmp, info, timings=shard is not None)
    return info


def _space_needed(gallery, query_images, dim: int, params: Params, boxes: str) -> int:
    """The extraction files' size, on the high side: every image with as many detections as
    the detector may keep (its gt boxes with boxes="gt"), every query, uncompressed rows."""
    if boxes == "gt":
        rows = sum(len(b) for b in gallery["boxes"])
    else:
        rows = len(gallery["image_id"]) * params.model.detections_per_img
    queries = sum(len(q) for q in query_images["query_ids"])
    detection_row = 4 + 4 * 4 + 4 + 4 * dim  # image_id, box, score, feature (float32)
    return rows * detection_row + queries * (4 + 4 * dim) + SMALL


def _check_modes(boxes: str, features: str, idnet: Path | None) -> None:
    if boxes not in BOXES_MODES:
        raise PsearchError(f"--boxes {boxes!r}: expected one of {', '.join(BOXES_MODES)}")
    if features not in FEATURES_MODES:
        raise PsearchError(f"--features {features!r}: expected one of {', '.join(FEATURES_MODES)}")
    if features == "idnet" and idnet is None:
        raise PsearchError("--features idnet needs --idnet PATH (the idnet.pt of psearch pretrain)")
    if features == "joint" and idnet is not None:
        raise PsearchError(f"--idnet {idnet}: only used with --features idnet")


def _finished(part: Path, settings: dict[str, Any]) -> bool:
    """A part already written with the same settings (atomic, so existing means complete)."""
    if not (part / "extraction.json").is_file():
        return False
    try:
        info = read_extraction_json(part)
    except PsearchError:
        return False
    return all(info.get(key) == value for key, value in settings.items())


# ---------------------------------------------------------------------------
# what to run on: columns of plain lists, one entry per image


def _image_table(tables: Manifests) -> dict[int, tuple[Path, int, int]]:
    root = dataset_root(tables)
    images = tables.images.to_pydict()
    return {
        image_id: (root / path, height, width)
        for image_id, path, width, height in zip(
            images["image_id"], images["path"], images["width"], images["height"], strict=True
        )
    }


def _boxes_by_image(table, image_ids: list[int]) -> list[np.ndarray]:
    """[k, 4] float32 x1y1x2y2 per image id, in the table's row order."""
    ids = table.column("image_id").to_numpy()
    coords = np.stack([table.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    return [coords[ids == image_id].astype(np.float32).reshape(-1, 4) for image_id in image_ids]


def _gallery_images(tables: Manifests) -> dict[str, list]:
    """Every test image in image_id order, with its annotated boxes (for --boxes gt)."""
    images = tables.images.to_pydict()
    test_ids = sorted(
        i for i, s in zip(images["image_id"], images["split"], strict=True) if s == "test"
    )
    if not test_ids:
        raise PsearchError(f"{tables.root / 'images.parquet'}: no test images to extract")
    lookup = _image_table(tables)
    return {
        "image_id": test_ids,
        "path": [lookup[i][0] for i in test_ids],
        "size": [lookup[i][1:] for i in test_ids],
        "boxes": _boxes_by_image(tables.boxes, test_ids),
    }


def _query_images(tables: Manifests) -> dict[str, list]:
    """Every image holding a query, in image_id order, with its query ids and boxes."""
    query_ids = tables.queries.column("query_id").to_numpy()
    image_ids = tables.queries.column("image_id").to_numpy()
    lookup = _image_table(tables)
    unique = sorted(set(image_ids.tolist()))
    for image_id in unique:
        if image_id not in lookup:
            raise PsearchError(
                f"{tables.root / 'queries.parquet'}: image_id {image_id} is not in images.parquet"
            )
    return {
        "image_id": unique,
        "path": [lookup[i][0] for i in unique],
        "size": [lookup[i][1:] for i in unique],
        "boxes": _boxes_by_image(tables.queries, unique),
        "query_ids": [query_ids[image_ids == i] for i in unique],
    }


def _select(columns: dict[str, list], positions: range) -> dict[str, list]:
    return {name: [values[p] for p in positions] for name, values in columns.items()}


class _Passes:
    """The models of one extraction and its two passes (gallery, queries)."""

    def __init__(self, model, idnet, params: Params, device, boxes: str, features: str) -> None:
        self.params, self.device = params, device
        self.boxes, self.features = boxes, features
        self.model, _ = load_joint(model, params, device)
        self.idnet, self.crop = (
            load_idnet(idnet, params, device) if features == "idnet" else (None, None)
        )
        self.dim = (self.idnet or self.model).feat_dim
        self.amp = params.extract.amp

    def _run(self, images: dict[str, list], step):
        cfg = self.params.extract
        keys = batch_keys(images["size"], self.params.model.min_size, self.params.model.max_size)
        return run_chunks(images["path"], keys, step, cfg.batch_size, cfg.num_workers, self.device)

    def _given_boxes_step(self, boxes: list[np.ndarray]):
        if self.features == "idnet":
            return engine.idnet_box_step(self.idnet, boxes, self.crop, self.amp)
        return engine.box_feature_step(self.model, boxes, self.amp)

    def gallery(self, images: dict[str, list], path: Path) -> int:
        """Stream every image's boxes, scores and features to `path`; returns the row count."""
        if self.boxes == "gt":
            features_step = self._given_boxes_step(images["boxes"])

            def step(positions, batch):
                scores = [np.ones(len(images["boxes"][p]), np.float32) for p in positions]
                feats = features_step(positions, batch)
                return [
                    (images["boxes"][p], s, f)
                    for p, s, f in zip(positions, scores, feats, strict=True)
                ]

        elif self.features == "idnet":
            step = engine.detect_idnet_step(self.model, self.idnet, self.crop, self.amp)
        else:
            step = engine.detect_step(self.model, self.amp)
        progress = tqdm(total=len(images["path"]), unit="img", desc="extract", mininterval=1.0)
        with GalleryWriter(path, self.dim) as writer, progress:
            for chunk in self._run(images, step):
                for position, (boxes, scores, features) in chunk:
                    writer.add(images["image_id"][position], boxes, scores, features)
                progress.update(len(chunk))
            return writer.rows

    def queries(self, images: dict[str, list], path: Path) -> int:
        """Features of the given query boxes (held in memory: one row per query)."""
        results: dict[int, np.ndarray] = {}
        step = self._given_boxes_step(images["boxes"])
        for chunk in self._run(images, step):
            for position, features in chunk:
                results.update(zip(images["query_ids"][position].tolist(), features, strict=True))
        return write_query_features(path, results, self.dim)
