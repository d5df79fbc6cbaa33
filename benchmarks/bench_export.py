"""CPU latency of an exported model (onnxruntime, TorchScript) against the PyTorch network.

A random-init joint net (latency does not depend on the weights) at the demo settings
(small backbone, shorter side 288, longer at most 480) is exported to ONNX and TorchScript;
each runtime answers the same 400x300 images with two query boxes, one image at a time, on
the CPU. Prints the median and p90 milliseconds per image after two warm-up calls.

    .venv/bin/python -W ignore benchmarks/bench_export.py [--images 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from psearch.config import load_params
from psearch.models.joint import build_joint_net
from psearch.serving.export import ExportedModel, export_net

BOXES = np.array([[40, 30, 90, 200], [200, 60, 260, 250]], np.float32)


def time_calls(call, images, warmup: int = 2) -> dict[str, float]:
    for image in images[:warmup]:
        call(image)
    times = []
    for image in images:
        started = time.perf_counter()
        call(image)
        times.append((time.perf_counter() - started) * 1000)
    return {
        "median_ms": round(float(np.median(times)), 1),
        "p90_ms": round(float(np.percentile(times, 90)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(None, ["tracking.enabled=false"])
    torch.manual_seed(0)
    net = build_joint_net(params.model, params.train.loss, 100).eval()
    rng = np.random.default_rng(0)
    images = [rng.random((3, 300, 400), dtype=np.float32) for _ in range(args.images)]

    def pytorch(image):
        tensor = torch.from_numpy(image)
        with torch.inference_mode():
            net([tensor])
            net.query_features([tensor], [torch.from_numpy(BOXES)])

    results = {"pytorch (eager, two passes: detect + query boxes)": time_calls(pytorch, images)}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
            info = export_net(net, fmt, Path(tmp) / name)
            model = ExportedModel(Path(tmp) / name)
            label = f"{fmt} ({'onnxruntime ' if fmt == 'onnx' else 'torch.jit '}one pass)"
            results[label] = {
                **time_calls(lambda im, m=model: m(im, BOXES), images),
                "export_s": info["seconds"],
                "MiB": round(info["bytes"] / 2**20, 1),
            }
    print(
        json.dumps(
            {
                "threads": args.threads,
                "images": args.images,
                "size": "400x300 -> 288x384",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
