"""`psearch extract --video`: detections and features of frames sampled from video footage.

The same forward pass as image extraction (engine.detect_step), fed by frames streamed from
the decoder (engine.run_stream) instead of image files. Outputs, in OUT/:

    gallery_detections.parquet  the contract's layout (docs/contract.md); image_id = sampled frame
    frames.parquet              image_id -> video, frame_index, time_s, width, height (video.py)
    extraction.json             settings, sampling, counts, decode and extraction frames/s

There are no queries in footage, so no query_features.parquet. `psearch search --gallery OUT`,
`psearch index` and `psearch serve` read frames.parquet in place of the manifests.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from psearch.atomic import atomic_dir
from psearch.config import Params
from psearch.data.manifest import GALLERY_DETECTIONS
from psearch.errors import PsearchError
from psearch.inference import engine
from psearch.inference.batching import padded_size
from psearch.inference.loading import inference_settings, load_joint, resolve_device
from psearch.inference.video import (
    FRAMES_FILE,
    Sampling,
    VideoFrame,
    frames_table,
    list_videos,
    sample_frames,
)
from psearch.inference.writer import GalleryWriter, write_extraction_json

__all__ = ["extract_video"]


def footage_version(videos: list[Path]) -> str:
    """Names, sizes and modification times of the videos: changes when the footage does,
    without reading hours of video to hash it."""
    digest = hashlib.sha256()
    for video in videos:
        stat = video.stat()
        digest.update(f"{video.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return "footage-sha256:" + digest.hexdigest()


class _Timed:
    """The sampled frames of every video, in order, counting the seconds spent decoding."""

    def __init__(self, videos: list[Path], sampling: Sampling) -> None:
        self.videos, self.sampling = videos, sampling
        self.decode_seconds = 0.0
        # (video, frame_index, time_s, width, height) per frame: the pixels are not kept.
        self.frames: list[tuple[str, int, float, int, int]] = []

    def __iter__(self) -> Iterator[VideoFrame]:
        for video in self.videos:
            frames = sample_frames(video, self.sampling)
            while True:
                started = time.perf_counter()
                frame = next(frames, None)
                self.decode_seconds += time.perf_counter() - started
                if frame is None:
                    break
                height, width = frame.pixels.shape[:2]
                where = str(frame.video.resolve())
                self.frames.append((where, frame.frame_index, frame.time_s, width, height))
                yield frame


def extract_video(
    video: Path,
    model: str,
    out: Path,
    params: Params,
    every_seconds: float | None = None,
    every_frames: int | None = None,
) -> dict[str, Any]:
    """Write OUT for the video file, or every video of the folder, `video`."""
    sampling = Sampling(every_seconds, every_frames)
    cfg = params.extract
    if cfg.batch_size < 1:
        raise PsearchError(f"extract.batch_size {cfg.batch_size}: need batch_size >= 1")
    videos = list_videos(Path(video))
    device = resolve_device(cfg.device)
    joint, _ = load_joint(model, params, device)
    source = _Timed(videos, sampling)

    def keyed() -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        for frame in source:
            height, width = frame.pixels.shape[:2]
            key = padded_size(height, width, params.model.min_size, params.model.max_size)
            yield key, torch.from_numpy(frame.pixels).permute(2, 0, 1)

    started = time.perf_counter()
    step = engine.detect_step(joint, cfg.amp)
    progress = tqdm(unit="frame", desc="extract video", mininterval=1.0)
    with atomic_dir(out) as tmp:
        with GalleryWriter(tmp / GALLERY_DETECTIONS, joint.feat_dim) as writer, progress:
            for batch in engine.run_stream(keyed(), step, cfg.batch_size, device):
                for position, (boxes, scores, features) in batch:
                    writer.add(position, boxes, scores, features)
                progress.update(len(batch))
            detections = writer.rows
        seconds = time.perf_counter() - started
        rows = [(i, *frame) for i, frame in enumerate(source.frames)]
        if not rows:
            raise PsearchError(f"{video}: no frame decoded (empty video?)")
        pq.write_table(frames_table(rows), tmp / FRAMES_FILE)
        info = {
            "source": "video",
            "boxes": "detect",
            "features": "joint",
            "model": str(model),
            "idnet": None,
            "data_version": footage_version(videos),
            "model_settings": inference_settings(params.model),
            "shard": None,
            "videos": [str(v.resolve()) for v in videos],
            "sampling": sampling.as_dict(),
            "feat_dim": joint.feat_dim,
            "images": len(rows),
            "frames": len(rows),
            "queries": 0,
            "detections": detections,
            "seconds": round(seconds, 3),
            "frames_per_s": round(len(rows) / seconds, 3) if seconds else None,
            "decode_seconds": round(source.decode_seconds, 3),
            "decode_frames_per_s": (
                round(len(rows) / source.decode_seconds, 3) if source.decode_seconds else None
            ),
            "device": str(device),
            "batch_size": cfg.batch_size,
            "amp": bool(cfg.amp and device.type == "cuda"),
        }
        write_extraction_json(tmp, info, timings=True)  # not a DVC stage's output
    return {**info, "out": str(out)}
