"""Video gallery throughput and memory: decoding alone, and psearch extract --video.

A synthetic 640x360 clip at 25 frames/s (H.264, a noisy street with a moving block) of two
lengths, each run in its own process: PyAV decode rate over every frame, then extraction
(small backbone at the demo resolution, shorter side 288, random-init model, CPU, batch 4) of
every 5th frame, with the peak RSS, to show that memory does not grow with the video's length
(frames are streamed, never all held; detections go to Parquet in row groups of 20,000).
The clip is encoded by the parent process, so a child's peak RSS is decoding and extraction.

    .venv/bin/python benchmarks/bench_video.py [--seconds 8 32] [--every-frames 5]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_extract import run_in_child

FPS, WIDTH, HEIGHT = 25, 640, 360


def write_video(path: Path, seconds: int) -> None:
    import av

    rng = np.random.default_rng(0)
    street = rng.integers(0, 200, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(seconds * FPS):
            pixels = street.copy()
            x = (index * 4) % (WIDTH - 60)
            pixels[100:300, x : x + 60] = (200, 40, 40)  # a "person" walking across
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def run_once(video: str, every_frames: int) -> dict:
    """Decode and extraction figures for one clip (written by the parent), in this process."""
    import torch

    from psearch.config import load_params, to_dict
    from psearch.inference.video import Sampling, sample_frames
    from psearch.inference.video_extract import extract_video
    from psearch.models.io import save_model
    from psearch.models.joint import build_joint_net

    torch.set_num_threads(2)
    overrides = [
        "model.backbone=small",
        "model.min_size=288",
        "model.max_size=480",
        "extract.device=cpu",
        "extract.batch_size=4",
        "tracking.enabled=false",
        # One test view, as the paper and the figures in benchmarks/README.md (the demo's six
        # views cost about 2.5 x per image: docs/extraction-and-search.md#test-time-views).
        "model.test_scale_factors=[]",
        "model.test_flip=false",
    ]
    params = load_params(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        decoded = sum(1 for _ in sample_frames(video, Sampling(every_frames=1)))
        decode_seconds = time.perf_counter() - started
        torch.manual_seed(0)
        net = build_joint_net(10, loss=to_dict(params.train.loss), **to_dict(params.model))
        model = save_model(tmp / "model.pt", net)
        info = extract_video(video, str(model), tmp / "dets", params, every_frames=every_frames)
    info["decoded"] = decoded
    info["decode_all_frames_per_s"] = decoded / decode_seconds
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--every-frames", type=int, default=5)
    args = parser.parse_args()
    print(
        f"CPU (2 torch threads): {WIDTH}x{HEIGHT} H.264 at {FPS} frames/s; small backbone, "
        f"frames resized to 288x512, batch 4, every {args.every_frames}th frame extracted"
    )
    for seconds in args.seconds:
        with tempfile.TemporaryDirectory() as tmp:
            video = Path(tmp) / "street.mp4"
            write_video(video, seconds)
            info = run_in_child(
                "bench_video", {"video": str(video), "every_frames": args.every_frames}
            )
        print(
            f"  {seconds:4d} s clip ({info['decoded']} frames): decode {info['decode_all_frames_per_s']:6.1f}"
            f" frames/s; extract {info['frames']} frames at {info['frames_per_s']:5.2f} frames/s"
            f" (of which decoding {info['decode_seconds']:.2f} s of {info['seconds']:.2f} s), "
            f"{info['detections']} detections, peak RSS {info['peak_rss_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
