"""The gallery index: a faiss nearest-neighbour index over an extraction's detections.

`build_index` reads an extraction directory (gallery_detections.parquet + extraction.json)
and writes INDEX/, a directory that is self-contained for searching:

    index.faiss        the vectors (row i = detection_id i); inner product, as `psearch search`
    detections.parquet detection_id, image_id, x1, y1, x2, y2, score (the rows the index points to)
    images.parquet     every gallery image: image_id, path (relative to INDEX), width, height; and for
                       a video gallery, video, frame_index, time_s (null for image files)
    index.json         kind and parameters, counts, the model's weights fingerprint and URI,
                       the data version, the extraction it came from (relative to INDEX); no
                       timings, so the same index has the same bytes (a DVC output)

`GalleryIndex.search` ranks gallery images by their most similar detection, as
`psearch.inference.search.rank_images` does over the full matrix, without a Python loop over
every detection: it asks faiss for a few candidates per wanted image and widens until enough
distinct images are found.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from psearch.atomic import atomic_dir, check_writable
from psearch.config import IndexConfig, Params, to_dict
from psearch.data.loaders import dataset_root
from psearch.data.manifest import GALLERY_DETECTIONS, feature_dim, read_manifests, read_parquet
from psearch.diskspace import SMALL, check_free_space
from psearch.errors import PsearchError
from psearch.inference.loading import fetch_model
from psearch.inference.video import frame_ref, is_video_extraction, read_frames
from psearch.inference.writer import read_extraction_json, recorded_manifests, relative_path
from psearch.jsonfile import read_json_object

INDEX_FORMAT = "psearch-index/1"
INDEX_JSON = "index.json"
INDEX_FILE = "index.faiss"
DETECTIONS_FILE = "detections.parquet"
IMAGES_FILE = "images.parquet"
# Candidates asked of faiss per wanted image before widening (most images hold few people).
OVERSAMPLE = 4
# IVF training sample per list (faiss warns below 39; more buys little).
TRAIN_PER_LIST = 64
PQ_TRAIN = 256 * 39

DETECTIONS_SCHEMA = pa.schema(
    [
        ("detection_id", pa.int64()),
        ("image_id", pa.int32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.int32()),
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("video", pa.string()),
        ("frame_index", pa.int64()),
        ("time_s", pa.float64()),
    ]
)
# Columns an index built before video galleries lacks: they read as null.
VIDEO_COLUMNS = ("video", "frame_index", "time_s")


# ---------------------------------------------------------------------------
# faiss indexes from the `index` settings


def auto_nlist(count: int) -> int:
    """4 sqrt(N) lists, each with at least 39 training points (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39 or 1))


def make_index(cfg: IndexConfig, dim: int, count: int) -> faiss.Index:
    """An empty (untrained) faiss index of `cfg.kind` for `count` vectors of `dim`."""
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if cfg.kind == "hnsw":
        if cfg.hnsw_m < 2 or cfg.ef_construction < 1 or cfg.ef_search < 1:
            raise PsearchError(
                f"index.hnsw_m {cfg.hnsw_m} / ef_construction {cfg.ef_construction} / "
                f"ef_search {cfg.ef_search}: need hnsw_m >= 2 and the efs >= 1"
            )
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        return index
    nlist = cfg.nlist or auto_nlist(count)
    if nlist < 1 or cfg.nprobe < 1 or cfg.pq_m < 0:
        raise PsearchError(
            f"index.nlist {cfg.nlist} / nprobe {cfg.nprobe} / pq_m {cfg.pq_m}: need nlist >= 0, "
            "nprobe >= 1, pq_m >= 0"
        )
    if cfg.pq_m and dim % cfg.pq_m:
        raise PsearchError(f"index.pq_m {cfg.pq_m}: must divide the feature size {dim}")
    quantizer = faiss.IndexFlatIP(dim)
    if cfg.pq_m:
        return faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)


def set_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    """Query-time knobs (not stored in the faiss file for every kind)."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(cfg.nprobe, ivf.nlist)


def fill_index(index: faiss.Index, features: np.ndarray, seed: int = 0) -> faiss.Index:
    """Train (when the kind needs it) on a sample, then add every row."""
    features = np.ascontiguousarray(features, np.float32)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        if len(features) < ivf.nlist:
            raise PsearchError(
                f"index: {len(features)} detections cannot train {ivf.nlist} lists "
                "(lower index.nlist, or use index.kind=flat)"
            )
        # A product quantizer learns 256 centroids per sub-vector: it needs ~10^4 points.
        wanted = ivf.nlist * TRAIN_PER_LIST
        if isinstance(index, faiss.IndexIVFPQ):
            wanted = max(wanted, PQ_TRAIN)
        sample = min(len(features), wanted)
        rows = np.random.default_rng(seed).choice(len(features), sample, replace=False)
        index.train(features[np.sort(rows)])
    index.add(features)
    return index


# ---------------------------------------------------------------------------
# model identity: which weights produced the features


def weights_fingerprint(model) -> str:
    """sha256 of the model's weights (names, dtypes, shapes, bytes): the same for a file, its
    directory and its MLflow copy, whatever the wrapping; different for any other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------
# building


def build_index(
    detections: Path,
    out: Path,
    params: Params,
    manifests: Path | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Write INDEX (`out`) for the extraction directory `detections`; returns index.json.

    `model` (default: the extraction's) is loaded once to fingerprint its weights, so a server
    can tell whether the model it serves made these features."""
    started = time.perf_counter()
    detections, out = Path(detections), Path(out)
    info = read_extraction_json(detections)
    if info.get("shard"):
        raise PsearchError(f"{detections}: is one shard of an extraction (run extract-merge)")
    cfg = params.index
    thresh = params.evaluate.det_thresh if cfg.det_thresh is None else cfg.det_thresh
    path = detections / GALLERY_DETECTIONS
    if not path.is_file():
        raise PsearchError(f"{path}: file not found (not an extraction output)")
    try:
        table = pq.read_table(path, filters=[("score", ">=", float(thresh))])
    except (OSError, pa.ArrowException) as exc:  # truncated, not Parquet, no score column
        raise PsearchError(f"{path}: not a readable Parquet file ({exc})") from None
    dim = feature_dim(table, path)
    recorded = info.get("feat_dim")
    if isinstance(recorded, int) and recorded != dim:
        raise PsearchError(
            f"{path}: features of {dim} dimensions, but {detections / 'extraction.json'} "
            f"says {recorded}"
        )
    features = table.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():  # faiss would index them and rank them at random
        raise PsearchError(
            f"{path}: the feature of detection row {int(np.argmin(finite))} (of those indexed) "
            "is not finite (NaN or inf)"
        )
    if not len(features):
        raise PsearchError(f"{path}: no detection with score >= {thresh} to index")
    images = _gallery_images(detections, info, manifests)
    image_ids = table.column("image_id").to_numpy()
    unknown = set(np.unique(image_ids).tolist()) - set(images.column("image_id").to_pylist())
    if unknown:
        raise PsearchError(f"{path}: image_id {min(unknown)} is not a gallery image")
    check_writable(out)
    # The vectors (float32), their rows and the image list; faiss's own overhead is small.
    check_free_space({out: len(features) * (4 * dim + 64) + images.num_rows * 256 + SMALL})
    model_uri = str(model or info.get("model"))
    fingerprint = weights_fingerprint(fetch_model(model_uri)[0])
    index = fill_index(make_index(cfg, dim, len(features)), features)
    rows = pa.Table.from_arrays(
        [
            pa.array(np.arange(len(features), dtype=np.int64)),
            *(table.column(name).combine_chunks() for name in DETECTIONS_SCHEMA.names[1:]),
        ],
        schema=DETECTIONS_SCHEMA,
    )
    meta = {
        "format": INDEX_FORMAT,
        "kind": cfg.kind,
        "settings": to_dict(cfg),
        "nlist": getattr(faiss.try_extract_index_ivf(index), "nlist", None),
        "metric": "inner_product",
        "dim": dim,
        "detections": int(index.ntotal),
        "images": images.num_rows,
        "det_thresh": thresh,
        "features": info.get("features", "joint"),
        "idnet": info.get("idnet"),
        "model": {"uri": model_uri, "fingerprint": fingerprint},
        "data_version": info.get("data_version", "unknown"),
        "extraction": relative_path(detections, out),
        "faiss_version": faiss.__version__,
    }
    with atomic_dir(out) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(rows, tmp / DETECTIONS_FILE)
        pq.write_table(_relative_image_paths(images, out), tmp / IMAGES_FILE)
        # index.json holds no timing: the same index hashes alike on every build (a DVC output).
        (tmp / INDEX_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "build_seconds": round(time.perf_counter() - started, 3), "out": str(out)}


def _relative_image_paths(images: pa.Table, out: Path) -> pa.Table:
    """images.parquet's image paths relative to the index directory (string operations only:
    a million paths), so an index hashes alike wherever it is built and moves with its
    data; a video frame's name (video.frame_ref) is not a path and stays."""
    base = str(Path(out).resolve())
    frames = images.column("video").is_valid().to_pylist()
    paths = [
        name if frame else os.path.relpath(name, base)
        for name, frame in zip(images.column("path").to_pylist(), frames, strict=True)
    ]
    return images.set_column(
        images.schema.get_field_index("path"), "path", pa.array(paths, pa.string())
    )


def _gallery_images(detections: Path, info: dict[str, Any], manifests: Path | None) -> pa.Table:
    """The extraction's gallery (the test split), with absolute image paths; for a video
    extraction its frames, each named by its video and time (video.frame_ref)."""
    if is_video_extraction(detections):
        frames = read_frames(detections).sort_by("image_id")
        names = [
            frame_ref(video, time_s)
            for video, time_s in zip(
                frames.column("video").to_pylist(), frames.column("time_s").to_pylist(), strict=True
            )
        ]
        return pa.Table.from_arrays(
            [
                frames.column("image_id"),
                pa.array(names, pa.string()),
                *(frames.column(c) for c in ("width", "height", "video", "frame_index", "time_s")),
            ],
            schema=IMAGES_SCHEMA,
        )
    manifests = recorded_manifests(detections, info, manifests)
    if not (manifests / "images.parquet").is_file():
        raise PsearchError(
            f"{detections / 'extraction.json'}: its manifests {manifests} are not there "
            "(pass --manifests DIR)"
        )
    tables = read_manifests(manifests)
    root = dataset_root(tables)
    images = tables.images.filter(pc.equal(tables.images.column("split"), "test"))
    images = images.sort_by("image_id")
    paths = [str((root / p).resolve()) for p in images.column("path").to_pylist()]
    return pa.Table.from_arrays(
        [
            images.column("image_id").cast(pa.int32()),
            pa.array(paths, pa.string()),
            images.column("width").cast(pa.int32()),
            images.column("height").cast(pa.int32()),
            *(pa.nulls(images.num_rows, IMAGES_SCHEMA.field(c).type) for c in VIDEO_COLUMNS),
        ],
        schema=IMAGES_SCHEMA,
    )


# ---------------------------------------------------------------------------
# searching


@dataclass(frozen=True)
class GalleryImage:
    """A gallery image; a video frame also has its video, frame index and time (seconds)."""

    image_id: int
    path: str
    width: int
    height: int
    video: str | None = None
    frame_index: int | None = None
    time_s: float | None = None

    def where(self) -> dict[str, Any]:
        """{video, frame, time_s} of a video frame (as `psearch search` gives them), else {}."""
        if self.video is None:
            return {}
        return {"video": self.video, "frame": self.frame_index, "time_s": self.time_s}


class GalleryIndex:
    """A built INDEX directory, loaded: the faiss index and the tables it points into."""

    def __init__(self, path: Path, params: IndexConfig | None = None) -> None:
        path = Path(path)
        self.path = path
        self.meta = read_index_json(path)
        try:
            self.index = faiss.read_index(str(path / INDEX_FILE))
        except RuntimeError:
            raise PsearchError(f"{path / INDEX_FILE}: not a faiss index") from None
        settings = self.meta.get("settings") or {}
        set_search_params(self.index, params or IndexConfig(**settings))
        rows = read_parquet(path / DETECTIONS_FILE, DETECTIONS_SCHEMA)
        if rows.num_rows != self.index.ntotal:
            raise PsearchError(
                f"{path}: {rows.num_rows} detections but {self.index.ntotal} vectors in the index"
            )
        self.image_ids = rows.column("image_id").to_numpy()
        self.boxes = np.stack([rows.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
        self.scores = rows.column("score").to_numpy()
        images = _read_images(path / IMAGES_FILE)
        base = str(path.resolve())  # resolved, as the paths were: a string compare finds an image
        self.images = {}
        for row in images.to_pylist():
            if row["video"] is None:  # relative to the index directory (absolute in older ones)
                row["path"] = os.path.normpath(os.path.join(base, row["path"]))
            self.images[row["image_id"]] = GalleryImage(**row)
        # Detections of one image, for drawing its boxes: rows sorted by image_id.
        self._order = np.argsort(self.image_ids, kind="stable")
        self._sorted_ids = self.image_ids[self._order]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def detections_of(self, image_id: int) -> np.ndarray:
        """detection_ids of one image, in the table's order."""
        lo, hi = np.searchsorted(self._sorted_ids, [image_id, image_id + 1])
        return np.sort(self._order[lo:hi])

    def detection(self, detection_id: int) -> dict[str, Any]:
        x1, y1, x2, y2 = (float(v) for v in self.boxes[detection_id])
        return {
            "detection_id": int(detection_id),
            "image_id": int(self.image_ids[detection_id]),
            "box": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)],
            "score": float(self.scores[detection_id]),
        }

    def search(
        self,
        query: np.ndarray,
        top_k: int,
        exclude_images: set[int] | frozenset = frozenset(),
        min_score: float | None = None,
    ) -> list[dict[str, Any]]:
        """The top_k gallery images by their most similar detection to `query` ([D]), leaving
        out the images in `exclude_images` and detections scored below `min_score`."""
        query = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        if query.shape[1] != self.dim:
            raise PsearchError(
                f"query feature has {query.shape[1]} dimensions, the index {self.dim} "
                "(another model?)"
            )
        total = len(self)
        wanted = min(top_k, len(set(self.images) - set(exclude_images)))
        k = min(total, max(top_k * OVERSAMPLE, 16))
        while True:
            sims, rows = self.index.search(query, k)
            matches = self._best_per_image(sims[0], rows[0], top_k, exclude_images, min_score)
            if len(matches) >= wanted or k >= total:
                return matches
            k = min(total, k * 4)

    def _best_per_image(self, sims, rows, top_k: int, exclude, min_score) -> list[dict[str, Any]]:
        matches, seen = [], set(exclude)
        for sim, row in zip(sims.tolist(), rows.tolist(), strict=True):
            if row < 0:  # faiss pads with -1 when fewer than k are reachable
                break
            if min_score is not None and self.scores[row] < min_score:
                continue
            image_id = int(self.image_ids[row])
            if image_id in seen:
                continue
            seen.add(image_id)
            match = self.detection(row)
            match.update(rank=len(matches) + 1, similarity=float(sim))
            match["image"] = self.images[image_id].path
            match.update(self.images[image_id].where())
            matches.append(match)
            if len(matches) == top_k:
                break
        return matches


def _read_images(path: Path) -> pa.Table:
    """images.parquet of an index, with the video columns (null) when it predates them."""
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in IMAGES_SCHEMA.names if c in names])
    except (OSError, pa.ArrowException) as exc:  # missing, truncated, not Parquet
        raise PsearchError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in IMAGES_SCHEMA.names if c not in names and c not in VIDEO_COLUMNS]
    if missing:
        raise PsearchError(f"{path}: no column {missing[0]!r} (not an index's images.parquet)")
    for column in VIDEO_COLUMNS:
        if column not in names:
            field = IMAGES_SCHEMA.field(column)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(IMAGES_SCHEMA.names)


def read_index_json(path: Path) -> dict[str, Any]:
    meta = read_json_object(
        Path(path) / INDEX_JSON, missing="file not found (not a psearch index output)"
    )
    if meta.get("format") != INDEX_FORMAT:
        raise PsearchError(
            f"{Path(path) / INDEX_JSON}: format {meta.get('format')!r}, expected {INDEX_FORMAT}"
        )
    return meta
