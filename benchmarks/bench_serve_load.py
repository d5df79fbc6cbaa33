"""Load test of `psearch serve` on loopback: sustained searches per second and latency.

Builds a gallery of N detections (default 10^5, 256-d) over the test scenes of
tests/conftest.py with a random-init joint model (the model's forward pass on the query box is
part of every search, as in real use), indexes it with `psearch index`, starts `psearch serve`
on 127.0.0.1 and keeps C concurrent clients (httpx, asyncio) searching for D seconds: half
the queries a drawn box in a gallery image, half a clicked detection.

    .venv/bin/python benchmarks/bench_serve_load.py [--detections 100000] [--clients 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import INFERENCE_OVERRIDES, SCENES, write_scene_dataset  # noqa: E402

from psearch.config import load_params  # noqa: E402
from psearch.inference.extract import extract  # noqa: E402
from psearch.inference.writer import gallery_table  # noqa: E402

OVERRIDES = [o for o in INFERENCE_OVERRIDES if not o.startswith("model.feat_dim")]
OVERRIDES += ["model.feat_dim=256", "index.det_thresh=0.0"]
# One test view, as the figures in benchmarks/README.md (the demo's six: about 2.5 x per image).
OVERRIDES += ["model.test_scale_factors=[]", "model.test_flip=false"]


def build_gallery(base: Path, detections: int) -> tuple[Path, Path]:
    """(extraction directory with `detections` synthetic rows, model file)."""
    import torch

    from psearch.models.io import save_model
    from psearch.models.joint import build_joint_net

    params = load_params(None, OVERRIDES)
    torch.manual_seed(0)
    model = save_model(base / "model.pt", build_joint_net(params.model, params.train.loss, 3))
    manifests = write_scene_dataset(base)
    dets = base / "dets"
    extract(manifests, str(model), dets, params)
    rng = np.random.default_rng(0)
    test = [(image_id, size) for image_id, size, _ in SCENES if image_id >= 2]
    which = rng.integers(0, len(test), detections)
    ids = np.array([test[i][0] for i in which], np.int32)
    heights = np.array([test[i][1][0] for i in which], np.float32)
    widths = np.array([test[i][1][1] for i in which], np.float32)
    x1, y1 = rng.uniform(0, 0.6, detections) * widths, rng.uniform(0, 0.5, detections) * heights
    boxes = np.stack([x1, y1, x1 + 0.3 * widths, y1 + 0.45 * heights], 1)
    feats = rng.standard_normal((detections, 256)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    scores = rng.uniform(0.5, 1.0, detections).astype(np.float32)
    pq.write_table(
        gallery_table(ids, boxes, scores, feats, 256), dets / "gallery_detections.parquet"
    )
    return dets, model


def psearch(*args: str, **kwargs) -> subprocess.Popen:
    sets = [item for o in OVERRIDES for item in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "psearch", *args, *sets], env=env, **kwargs)


async def hammer(url: str, clients: int, seconds: float, detections: int) -> dict:
    latencies, statuses = [], []
    rng = np.random.default_rng(1)
    deadline = time.perf_counter() + seconds

    async def client(session: httpx.AsyncClient, i: int):
        while time.perf_counter() < deadline:
            if rng.random() < 0.5:
                data = {"detection_id": int(rng.integers(0, detections))}
            else:
                data = {"image_id": int(rng.integers(2, 10)), "box": "10,8,30,70"}
            started = time.perf_counter()
            response = await session.post("/search", data=data)
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(clients)))
        wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "qps": len(latencies) / wall,
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "errors": sum(s != 200 for s in statuses),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    server = None
    try:
        dets, model = build_gallery(base, args.detections)
        index = base / "index"
        built = psearch("index", "--detections", str(dets), "--out", str(index),
                        stdout=subprocess.DEVNULL)  # fmt: skip
        if built.wait() != 0:
            return 1
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = psearch("serve", "--index", str(index), "--model", str(model), "--port",
                         str(port), "--log-level", "warning", "--reload-interval", "0")  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        asyncio.run(hammer(url, 2, 2.0, args.detections))  # warm-up
        result = asyncio.run(hammer(url, args.clients, args.seconds, args.detections))
        print(
            f"psearch serve, {args.detections:,} detections (flat index, 256-d), "
            f"{args.clients} clients for {args.seconds:.0f} s on loopback, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}:\n"
            f"  {result['requests']} searches, {result['qps']:.1f} searches/s, "
            f"p50 {result['p50'] * 1e3:.0f} ms, p99 {result['p99'] * 1e3:.0f} ms, "
            f"{result['errors']} errors"
        )
        return 0 if result["errors"] == 0 else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
