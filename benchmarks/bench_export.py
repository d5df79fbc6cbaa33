"""CPU latency of an exported model (onnxruntime, TorchScript) against PyTorch, like for like.

One joint net at the demo settings (small backbone, shorter side 288, longer at most 480, up
to 100 detections), He-initialised so that detections and NMS do a trained net's amount of
work (latency does not depend on what the weights mean), answers the same images in every
runtime:

- full pass: image -> boxes, scores, features, plus the features of two query boxes (what
  the exported graph computes). PyTorch eager runs the very module that is exported
  (SearchGraph); `psearch extract`'s two calls (detect, then query boxes) are shown too.
- query path: image + one box -> its feature (what `psearch serve` computes per search).
  PyTorch: JointNet.query_features (no detector); onnxruntime is asked for the
  query_features output alone (it still runs the whole graph: it does not prune); TorchScript
  runs its whole graph.

Like for like: the same images (400x300, resized to 288x384) and boxes, the same number of
threads for torch (intra-op) and onnxruntime (intra_op_num_threads; sequential execution), the
runtimes interleaved image by image (a busy machine slows them alike), warm-up calls excluded;
median and p90 of --images calls each.

    .venv/bin/python -W ignore benchmarks/bench_export.py [--images 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from psearch.config import load_params, to_dict
from psearch.models.joint import build_joint_net
from psearch.serving.export import ExportedModel, SearchGraph, export_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_fixtures import he_init  # noqa: E402  (the tests' He init, shared)

SIZE = (300, 400)
BOXES = np.array([[40, 30, 90, 200], [200, 60, 260, 250]], np.float32)
WARMUP = 3


def build_net(params) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {"loss": to_dict(params.train.loss), **to_dict(params.model)}
    return he_init(build_joint_net(100, **settings)).eval()


def pytorch_calls(net) -> dict:
    graph = SearchGraph(net).eval()

    def exported_module(image):
        with torch.inference_mode():
            return graph(torch.from_numpy(image), torch.from_numpy(BOXES))

    def extract_two_calls(image):
        tensor = torch.from_numpy(image)
        with torch.inference_mode():
            net([tensor])
            return net.query_features([tensor], [torch.from_numpy(BOXES)])

    def query(image):
        with torch.inference_mode():
            return net.query_features([torch.from_numpy(image)], [torch.from_numpy(BOXES[:1])])

    return {"full": exported_module, "extract": extract_two_calls, "query": query}


def time_interleaved(calls: dict, images: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """{name: median/p90 ms}: every call on every image, the calls taking turns per image."""
    for image in images[:WARMUP]:
        for call in calls.values():
            call(image)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for image in images:
        for name, call in calls.items():
            started = time.perf_counter()
            call(image)
            times[name].append((time.perf_counter() - started) * 1000)
    return {
        name: {
            "median_ms": round(float(np.median(t)), 1),
            "p90_ms": round(float(np.percentile(t, 90)), 1),
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One test view, as the figures in benchmarks/README.md (the demo's six: about 2.5 x).
    params = load_params(
        None, ["tracking.enabled=false", "model.test_scale_factors=[]", "model.test_flip=false"]
    )
    net = build_net(params)
    rng = np.random.default_rng(0)
    images = [rng.random((3, *SIZE), dtype=np.float32) for _ in range(args.images)]
    torch_calls = pytorch_calls(net)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_info = export_net(net, "onnx", Path(tmp) / "model.onnx")
        script_info = export_net(net, "torchscript", Path(tmp) / "model.pt")
        onnx = ExportedModel(Path(tmp) / "model.onnx", threads=args.threads)
        script = ExportedModel(Path(tmp) / "model.pt")
        full = time_interleaved(
            {
                "pytorch eager (the exported module, one pass)": torch_calls["full"],
                "pytorch eager (psearch extract: detect, then query boxes)": torch_calls["extract"],
                "onnxruntime": lambda im: onnx(im, BOXES),
                "torchscript": lambda im: script(im, BOXES),
            },
            images,
        )
        query = time_interleaved(
            {
                "pytorch eager (JointNet.query_features)": torch_calls["query"],
                "onnxruntime (query_features output only)": lambda im: onnx.query_features(
                    im, BOXES[:1]
                ),
                "torchscript (whole graph)": lambda im: script.query_features(im, BOXES[:1]),
            },
            images,
        )
    detections = len(torch_calls["full"](images[0])[0])
    print(
        json.dumps(
            {
                "threads": args.threads,
                "images": args.images,
                "warmup": WARMUP,
                "size": f"{SIZE[1]}x{SIZE[0]} -> 384x288",
                "detections_per_image": detections,
                "full_pass": full,
                "query_path": query,
                "files_MiB": {
                    "onnx": round(onnx_info["bytes"] / 2**20, 1),
                    "torchscript": round(script_info["bytes"] / 2**20, 1),
                },
                "export_s": {"onnx": onnx_info["seconds"], "torchscript": script_info["seconds"]},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
