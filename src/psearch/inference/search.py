"""`psearch search`: find the person in a query box among a gallery's detections.

The query feature comes from the given box (`query_features`, or IDNet crops when the gallery
was extracted with IDNet features). The gallery is either a folder of images, detected now
with the same batching as `psearch extract`, or an extraction directory, whose stored
detections are read instead of running the network over the gallery again. Detections below
the detection threshold are dropped; each gallery image is ranked by its most similar
detection (the query's own image is never in its gallery). With `cbgm`, similarities are
re-ranked with the query image's other people first (psearch.cbgm, via inference.context).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from psearch.config import Params
from psearch.data.manifest import GALLERY_DETECTIONS, feature_dim, read_manifests
from psearch.errors import PsearchError
from psearch.inference.context import detect_query_image, rerank
from psearch.inference.render import is_clip, render_clip, render_search
from psearch.inference.video import FRAMES_FILE, frame_ref, is_video_extraction, read_frames
from psearch.inference.writer import read_extraction_json, recorded_manifests

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_box(text: str) -> list[float]:
    """'X,Y,W,H' -> [x, y, w, h] (pixels)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(np.isfinite(values)):
        raise PsearchError(f"--box {text!r}: expected X,Y,W,H in pixels, e.g. 10,20,40,100")
    if values[2] <= 0 or values[3] <= 0:
        raise PsearchError(f"--box {text!r}: width and height must be positive")
    return values


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, UnidentifiedImageError) as exc:
        raise PsearchError(f"{path}: cannot read image ({exc})") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_model(a: str, b: str) -> bool:
    """The same URI, or two local paths naming the same file or directory."""
    return a == b or _same_file(Path(a), Path(b))


def search(
    model: str,
    query: Path,
    box: list[float],
    gallery: Path | None,
    params: Params,
    top_k: int = 10,
    out: Path | None = None,
    det_thresh: float | None = None,
    manifests: Path | None = None,
    index: Path | None = None,
    cbgm: bool = False,
) -> dict[str, Any]:
    """Rank the gallery's images for the person at `box` (x, y, w, h) in `query` (the gallery
    is `index`, a `psearch index` output, when given)."""
    # lazy: torch takes seconds to import; the command line imports this module at start-up
    from psearch.inference.loading import load_joint, resolve_device

    if top_k < 1:
        raise PsearchError(f"--top-k {top_k}: must be at least 1")
    if (gallery is None) == (index is None):
        raise PsearchError("give one of --gallery or --index")
    if cbgm and index is not None:
        raise PsearchError("--cbgm needs --gallery: an index keeps no detections per image")
    query = Path(query)
    gallery = Path(gallery if index is None else index)
    height, width = _image_size(query)
    x, y, w, h = box
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise PsearchError(
            f"--box {x:g},{y:g},{w:g},{h:g}: outside the image {query} ({width}x{height})"
        )
    query_xyxy = np.array([[x, y, x + w, y + h]], np.float32)
    thresh = params.evaluate.det_thresh if det_thresh is None else det_thresh
    device = resolve_device(params.extract.device)
    joint, _ = load_joint(model, params, device)
    notes, frames = [], {}
    if index is not None:
        return _search_index(
            gallery, query, [x, y, w, h], query_xyxy, joint, params, device, top_k, thresh, out
        )
    if (gallery / GALLERY_DETECTIONS).is_file():
        source, info = "extraction", read_extraction_json(gallery)
        if not _same_model(str(info.get("model")), str(model)):
            notes.append(
                f"note: {gallery} was extracted with {info.get('model')}, the query uses "
                f"{model}; similarities are only meaningful for the same model"
            )
        if is_video_extraction(gallery):
            source = "video"
            image_paths, boxes, scores, feats, frames = _stored_frames(gallery, thresh)
        else:
            image_paths, boxes, scores, feats = _stored_gallery(gallery, info, thresh, manifests)
        # The query's own image is never in its gallery (a folder listing skips it already).
        own = {p for p in set(image_paths.tolist()) if _same_file(Path(p), query)}
        keep = np.array([p not in own for p in image_paths], bool)
        context = (boxes[~keep], scores[~keep], feats[~keep])  # the query image's, if stored
    elif gallery.is_dir():
        source, info = "folder", {"features": "joint"}
        image_paths, boxes, scores, feats = _detect_folder(gallery, query, joint, params, device)
        keep = scores >= thresh  # (stored detections were read with this threshold already)
        context = detect_query_image(query, joint, params, device, thresh) if cbgm else None
    else:
        raise PsearchError(f"{gallery}: not found (a folder of images or a psearch extract output)")
    image_paths, boxes, scores, feats = image_paths[keep], boxes[keep], scores[keep], feats[keep]
    query_feature = _query_feature(query, query_xyxy, joint, info, params, device)
    if feats.shape[1] != query_feature.shape[0]:
        raise PsearchError(
            f"{gallery}: gallery features have {feats.shape[1]} dimensions, the query "
            f"{query_feature.shape[0]} (extracted with another model?)"
        )
    sims = feats @ query_feature
    if cbgm:
        sims, note = rerank(sims, image_paths, feats, query_feature, query_xyxy[0], context)
        notes.append(note)
    matches = rank_images(image_paths, boxes, scores, sims, top_k)
    for match in matches:  # video frames: which video, which frame, when
        match.update(frames.get(match["image"], {}))
    return _result(query, [x, y, w, h], query_xyxy, gallery, source, thresh, matches, notes, out)


def _result(query, box, query_xyxy, gallery, source, thresh, matches, notes, out):
    result = {
        "query": str(query),
        "box": box,
        "gallery": str(gallery),
        "source": source,
        "det_thresh": thresh,
        "matches": matches,
        "picture": None,
        "notes": notes,
    }
    if out is not None and is_clip(Path(out)):
        render_clip(matches, Path(out))
        result["picture"] = str(out)
    elif out is not None:
        render_search(query, query_xyxy[0].tolist(), matches, Path(out))
        result["picture"] = str(out)
    return result


def _search_index(path, query, box, query_xyxy, joint, params, device, top_k, thresh, out):
    """search() over a built index: faiss finds the candidates, no full matrix is read."""
    # lazy: faiss and torch take seconds to import; the command line imports this module at start-up
    from psearch.inference.index import GalleryIndex, weights_fingerprint

    gallery = GalleryIndex(path)
    meta, notes = gallery.meta, []
    if weights_fingerprint(joint) != (meta.get("model") or {}).get("fingerprint"):
        notes.append(
            f"note: {path} was built from features of {(meta.get('model') or {}).get('uri')}, "
            "not this model; similarities are only meaningful for the same model"
        )
    if thresh < meta.get("det_thresh", 0.0):
        notes.append(
            f"note: {path} holds only detections with score >= {meta['det_thresh']} "
            f"(asked for >= {thresh})"
        )
    info = {"features": meta.get("features"), "idnet": meta.get("idnet")}
    query_feature = _query_feature(query, query_xyxy, joint, info, params, device)
    # The query's own image is never in its gallery.
    # (index paths are stored resolved: a string compare, no stat of every image)
    resolved = str(query.resolve())
    own = {i for i, image in gallery.images.items() if image.path == resolved}
    matches = gallery.search(query_feature, top_k, own, min_score=thresh)
    return _result(query, box, query_xyxy, path, "index", thresh, matches, notes, out)


def rank_images(
    image_paths: np.ndarray, boxes: np.ndarray, scores: np.ndarray, sims: np.ndarray, top_k: int
) -> list[dict[str, Any]]:
    """The top_k images by their most similar detection (ties: earlier detection first)."""
    order = np.argsort(-sims, kind="stable")
    matches, seen = [], set()
    for row in order:
        image = str(image_paths[row])
        if image in seen:
            continue
        seen.add(image)
        matches.append(
            {
                "rank": len(matches) + 1,
                "image": image,
                "box": [round(float(v), 2) for v in boxes[row]],
                "similarity": float(sims[row]),
                "score": float(scores[row]),
            }
        )
        if len(matches) == top_k:
            break
    return matches


def format_matches(result: dict[str, Any]) -> str:
    lines = [*result.get("notes", [])]
    lines.append(f"query {result['query']} box {','.join(f'{v:g}' for v in result['box'])}")
    if not result["matches"]:
        lines.append(f"no detection with score >= {result['det_thresh']} in the gallery")
    for match in result["matches"]:
        x1, y1, x2, y2 = match["box"]
        lines.append(
            f"{match['rank']:>3}  similarity {match['similarity']:.4f}  score "
            f"{match['score']:.3f}  box {x1:.0f},{y1:.0f},{x2 - x1:.0f},{y2 - y1:.0f}  "
            f"{match['image']}"
            + (f"  frame {match['frame']} at {match['time_s']:.3f} s" if "video" in match else "")
        )
    if result["picture"]:
        lines.append(f"picture: {result['picture']}")
    return "\n".join(lines) + "\n"


# One row per match in --format csv; video, frame and time_s are empty for an image gallery.
CSV_COLUMNS = ("rank", "image", "x1", "y1", "x2", "y2", "similarity", "score")
CSV_VIDEO_COLUMNS = ("video", "frame", "time_s")


def format_result(result: dict[str, Any], fmt: str) -> str:
    """The search result as text (format_matches), JSON (the whole result) or CSV (matches)."""
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*CSV_COLUMNS, *CSV_VIDEO_COLUMNS])
        for m in result["matches"]:
            row = [m["rank"], m["image"], *m["box"], m["similarity"], m["score"]]
            writer.writerow(row + [m.get(c, "") for c in CSV_VIDEO_COLUMNS])
        return out.getvalue()
    return format_matches(result)


# ---------------------------------------------------------------------------
# the query and the kinds of gallery


def _query_feature(
    query: Path, box: np.ndarray, joint, info: dict[str, Any], params: Params, device
) -> np.ndarray:
    """The query box's feature, computed as the gallery's were (joint net, or IDNet crops)."""
    # lazy: torch takes seconds to import; the command line imports this module at start-up
    from psearch.inference import engine
    from psearch.inference.loading import load_idnet

    amp = params.extract.amp
    if info.get("features") == "idnet":
        idnet, crop = load_idnet(info["idnet"], params, device)
        step = engine.idnet_box_step(idnet, [box], crop, amp)
    else:
        step = engine.box_feature_step(joint, [box], amp)
    ((_, features),) = next(engine.run_chunks([query], [None], step, 1, 0, device))
    return features[0]


def _stored_gallery(gallery: Path, info: dict[str, Any], thresh: float, manifests: Path | None):
    """(image paths, boxes, scores, features) of an extraction's detections with score >=
    thresh; image paths come from the manifests the extraction was made from."""
    # lazy: torch takes seconds to import; the command line imports this module at start-up
    from psearch.data.loaders import dataset_root

    manifests = recorded_manifests(gallery, info, manifests)
    if not (manifests / "images.parquet").is_file():
        raise PsearchError(
            f"{gallery / 'extraction.json'}: its manifests {manifests} are not there "
            "(pass --manifests DIR)"
        )
    tables = read_manifests(manifests)
    root = dataset_root(tables)
    images = tables.images.to_pydict()
    paths = {i: str(root / p) for i, p in zip(images["image_id"], images["path"], strict=True)}
    return _read_detections(gallery, thresh, paths, manifests / "images.parquet")


def _stored_frames(gallery: Path, thresh: float):
    """As _stored_gallery for a video extraction: each frame is named by frame_ref (its video
    and time); also returns {frame name: video, frame index, time}."""
    frames = read_frames(gallery).to_pydict()
    names, where = {}, {}
    for image_id, video, index, time_s in zip(
        frames["image_id"], frames["video"], frames["frame_index"], frames["time_s"], strict=True
    ):
        names[image_id] = frame_ref(video, time_s)
        where[names[image_id]] = {"video": video, "frame": index, "time_s": time_s}
    return (*_read_detections(gallery, thresh, names, gallery / FRAMES_FILE), where)


def _read_detections(gallery: Path, thresh: float, names: dict[int, str], listing: Path):
    """(image names, boxes, scores, features) of the detections with score >= thresh; `names`
    maps image_id to the image's name (`listing` is where they come from, for errors)."""
    path = gallery / GALLERY_DETECTIONS
    table = pq.read_table(path, filters=[("score", ">=", float(thresh))])
    dim = feature_dim(table, path)
    ids = table.column("image_id").to_numpy()
    missing = set(np.unique(ids).tolist()) - set(names)
    if missing:
        raise PsearchError(f"{path}: image_id {min(missing)} is not in {listing}")
    image_paths = np.array([names[i] for i in ids.tolist()], dtype=object)
    boxes = np.stack([table.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    scores = table.column("score").to_numpy()
    flat = table.column("feature").combine_chunks().flatten().to_numpy()
    return image_paths, boxes.reshape(-1, 4), scores, flat.reshape(-1, dim)


def _detect_folder(folder: Path, query: Path, joint, params: Params, device):
    """(image paths, boxes, scores, features) of every detection in a folder of images."""
    # lazy: torch takes seconds to import; the command line imports this module at start-up
    from psearch.inference import engine

    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _same_file(p, query)
    )
    if not files:
        raise PsearchError(
            f"{folder}: no gallery images ({', '.join(IMAGE_SUFFIXES)}) besides the query"
        )
    cfg = params.extract
    keys = engine.batch_keys(
        [_image_size(p) for p in files], params.model.min_size, params.model.max_size
    )
    step = engine.detect_step(joint, cfg.amp)
    paths, boxes, scores, feats = [], [], [], []
    for chunk in engine.run_chunks(files, keys, step, cfg.batch_size, cfg.num_workers, device):
        for position, (image_boxes, image_scores, image_feats) in chunk:
            paths.extend([str(files[position])] * len(image_scores))
            boxes.append(image_boxes)
            scores.append(image_scores)
            feats.append(image_feats)
    dim = joint.feat_dim
    return (
        np.array(paths, dtype=object),
        np.concatenate(boxes).reshape(-1, 4),
        np.concatenate(scores),
        np.concatenate(feats).reshape(-1, dim),
    )
