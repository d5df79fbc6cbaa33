"""Video footage as a gallery: which files are videos, which frames to sample, reading a frame back.

Decoding is PyAV's (FFmpeg bindings; wheels ship their own FFmpeg, so it installs and decodes
everywhere pip does, unlike torchvision's video reader, which needs a torchvision built with
FFmpeg). Frames are streamed from the decoder one at a time and never all held, so memory stays
flat over a long video. A sampled frame is one gallery image: frames.parquet (next to the
extraction's gallery_detections.parquet) maps its image_id to its video, frame index (0-based,
in presentation order) and timestamp in seconds from the start of the stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from psearch.errors import PsearchError

FRAMES_FILE = "frames.parquet"
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts")
FRAMES_SCHEMA = pa.schema(
    [
        ("image_id", pa.int32()),
        ("video", pa.string()),
        ("frame_index", pa.int64()),
        ("time_s", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Sampling:
    """Which frames become gallery images: one every `every_seconds` of video time, or every
    `every_frames`-th decoded frame (exactly one of the two)."""

    every_seconds: float | None = None
    every_frames: int | None = None

    def __post_init__(self) -> None:
        if (self.every_seconds is None) == (self.every_frames is None):
            raise PsearchError("give one of --every-seconds or --every-frames")
        if self.every_seconds is not None and not (
            math.isfinite(self.every_seconds) and self.every_seconds > 0
        ):
            raise PsearchError(f"--every-seconds {self.every_seconds}: must be a number > 0")
        if self.every_frames is not None and self.every_frames < 1:
            raise PsearchError(f"--every-frames {self.every_frames}: must be at least 1")

    def as_dict(self) -> dict[str, float | int | None]:
        return {"every_seconds": self.every_seconds, "every_frames": self.every_frames}


@dataclass(frozen=True)
class VideoFrame:
    """One sampled frame: uint8 [H, W, 3] RGB pixels and where it is in its video."""

    video: Path
    frame_index: int
    time_s: float
    pixels: np.ndarray


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _open(path: Path):
    """(container, its first video stream); PsearchError naming the file when it is none."""
    if not path.is_file():
        raise PsearchError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise PsearchError(f"{path}: not a readable video ({_one_line(exc)})") from None
    if not container.streams.video:
        container.close()
        raise PsearchError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
    return container, stream


def list_videos(path: Path) -> list[Path]:
    """A video file, or the video files (by suffix) of a folder in name order; each is opened
    once here, so a bad file is named before any work starts."""
    path = Path(path)
    if path.is_dir():
        videos = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise PsearchError(f"{path}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    elif path.exists():
        videos = [path]
    else:
        raise PsearchError(f"{path}: video file or folder not found")
    for video in videos:
        container, _ = _open(video)
        container.close()
    return videos


def _time_of(frame, stream, position: int) -> float:
    """Seconds from the stream's start: from the frame's pts, else its position and the rate."""
    if frame.pts is not None and stream.time_base is not None:
        start = stream.start_time or 0
        return float((frame.pts - start) * stream.time_base)
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
    return position / rate


def sample_frames(video: Path, sampling: Sampling) -> Iterator[VideoFrame]:
    """The sampled frames of one video, decoded one at a time, in presentation order."""
    video = Path(video)
    container, stream = _open(video)
    next_time = 0.0
    try:
        for index, frame in enumerate(container.decode(stream)):
            time_s = _time_of(frame, stream, index)
            if sampling.every_frames is not None:
                if index % sampling.every_frames:
                    continue
            else:
                # Half a millisecond of slack: 1/3 s steps must not miss a frame at 0.333 s.
                if time_s < next_time - 5e-4:
                    continue
                steps = math.floor((time_s + 5e-4) / sampling.every_seconds) + 1
                next_time = steps * sampling.every_seconds
            yield VideoFrame(video, index, round(time_s, 6), frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as exc:
        raise PsearchError(f"{video}: cannot decode video ({_one_line(exc)})") from None
    finally:
        container.close()


def read_frame(video: str | Path, frame_index: int, time_s: float) -> np.ndarray:
    """uint8 [H, W, 3] RGB of the frame sampled at `time_s` (`frame_index` as recorded): seek to
    the keyframe before it, decode forward to it."""
    video = Path(video)
    container, stream = _open(video)
    try:
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        slack = 0.5 / rate  # half a frame: times are stored rounded
        if stream.time_base is not None and time_s > slack:
            start = stream.start_time or 0
            target = int(start + (time_s - slack) / stream.time_base)
            container.seek(max(start, target), stream=stream, backward=True, any_frame=False)
        else:
            container.seek(0, stream=stream)
        for position, frame in enumerate(container.decode(stream)):
            if frame.pts is None:
                if position == frame_index:  # no timestamps: only a decode from 0 finds it
                    return frame.to_ndarray(format="rgb24")
            elif _time_of(frame, stream, position) >= time_s - slack:
                return frame.to_ndarray(format="rgb24")
    except av.FFmpegError as exc:
        raise PsearchError(f"{video}: cannot decode video ({_one_line(exc)})") from None
    finally:
        container.close()
    raise PsearchError(f"{video}: no frame at {time_s:.3f} s (frame {frame_index})")


def query_still(video: Path, time_s: float | None, directory: Path) -> Path:
    """The frame of `video` at `time_s` seconds saved as a PNG in `directory`: a query person
    taken from footage (psearch search --query VIDEO --query-time S)."""
    video = Path(video)
    if video.suffix.lower() not in VIDEO_SUFFIXES:
        raise PsearchError(f"--query-time: {video} is not a video ({', '.join(VIDEO_SUFFIXES)})")
    if time_s is None:
        raise PsearchError(f"--query {video}: a video needs --query-time SECONDS (which frame)")
    if not math.isfinite(time_s) or time_s < 0:
        raise PsearchError(f"--query-time {time_s}: expected seconds >= 0")
    if not video.is_file():
        raise PsearchError(f"{video}: video not found")
    pixels = read_frame(video, -1, time_s)
    still = Path(directory) / f"{video.stem}-t{time_s:.3f}.png"
    Image.fromarray(pixels).save(still)
    return still


def frame_ref(video: str | Path, time_s: float) -> str:
    """A frame's name: the video path with a W3C media-fragment time, e.g. cam1.mp4#t=12.500."""
    return f"{video}#t={time_s:.3f}"


def frames_table(rows: list[tuple[int, str, int, float, int, int]]) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in FRAMES_SCHEMA]
    return pa.Table.from_arrays(
        [pa.array(list(c), f.type) for c, f in zip(columns, FRAMES_SCHEMA, strict=True)],
        schema=FRAMES_SCHEMA,
    )


def read_frames(directory: Path) -> pa.Table:
    """frames.parquet of a video extraction (PsearchError when it is not one)."""
    path = Path(directory) / FRAMES_FILE
    if not path.is_file():
        raise PsearchError(f"{path}: file not found (not a video extraction)")
    try:
        return pq.read_table(path, schema=FRAMES_SCHEMA)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PsearchError(f"{path}: not a frames table ({_one_line(exc)})") from None


def is_video_extraction(directory: Path) -> bool:
    return (Path(directory) / FRAMES_FILE).is_file()


# Containers a clip may be written as, by suffix, and the codecs to try in order.
CLIP_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}
CLIP_CODECS = ("libx264", "h264", "mpeg4")


def write_clip(pictures: list[np.ndarray], path: Path, fps: int, hold: int, suffix: str) -> None:
    """Encode uint8 [H, W, 3] RGB pictures (one size, even sides) to the video `path` (its
    container from CLIP_FORMATS by `suffix`), each shown for `hold` frames at `fps`."""
    container_format = CLIP_FORMATS[suffix.lower()]
    codec = next(c for c in CLIP_CODECS if c in av.codecs_available)
    height, width = pictures[0].shape[:2]
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        shown = 0
        for picture in pictures:
            for _ in range(hold):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
                frame.pts, frame.time_base = shown, Fraction(1, fps)
                container.mux(stream.encode(frame))
                shown += 1
        container.mux(stream.encode())
