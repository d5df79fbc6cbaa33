"""Benchmark the gallery index (psearch.inference.index) against today's `psearch search` path.

Gallery: N detections of 256-d unit features (float32). Speed does not depend on the values;
recall does, and uniform random vectors have no neighbours worth the name, so the features are
drawn around 4,096 centres (a gallery of people seen several times), queries near gallery rows.

Per N, per index kind: build time, index memory, one-query latency (p50 / p99) and a batch of
100 queries, and recall@10 of the approximate kinds against the exact one. In the same run: the
machine's memory read bandwidth (a 1 GiB float32 sum, best of 5) — the physical limit of an
exact scan — and today's `psearch search` path on the same gallery: read
gallery_detections.parquet, `features @ query`, `rank_images` (what one `psearch search
--gallery DETS` invocation does after the model), plus its in-memory part alone.

    .venv/bin/python benchmarks/bench_search.py [--sizes 10000 100000 1000000] [--hnsw-max 100000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from psearch.config import IndexConfig
from psearch.inference.index import auto_nlist, fill_index, make_index, set_search_params
from psearch.inference.search import rank_images
from psearch.inference.writer import gallery_table

DIM = 256
CENTRES = 4096


def features(n: int, seed: int = 0, chunk: int = 250_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = centres[rng.integers(0, CENTRES, stop - start)]
        block += 0.35 * rng.standard_normal(block.shape, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def queries(data: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = data[rng.integers(0, len(data), count)] + 0.1 * rng.standard_normal((count, DIM))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def bandwidth_gbs(gib: float = 1.0) -> float:
    """Read bandwidth: a float32 sum over `gib` GiB (memory-bound on any recent CPU)."""
    a = np.ones(int(gib * 2**30 / 4), np.float32)
    best = min(_timed(lambda: a.sum()) for _ in range(5))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latencies(index, qs: np.ndarray, k: int = 10) -> tuple[float, float]:
    times = [_timed(lambda q=q: index.search(q[None], k)) for q in qs]
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall_at_10(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)]))


def index_bytes(index) -> int:
    return len(faiss.serialize_index(index))


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def today_path(data: np.ndarray, qs: np.ndarray, workdir: Path) -> tuple[float, float]:
    """(seconds per query from the parquet file, seconds per query in memory) of the code
    `psearch search --gallery DETS` runs after computing the query feature."""
    n = len(data)
    ids = np.arange(n, dtype=np.int32) // 6  # ~6 detections per image
    boxes = np.zeros((n, 4), np.float32)
    scores = np.ones(n, np.float32)
    path = workdir / "gallery_detections.parquet"
    pq.write_table(gallery_table(ids, boxes, scores, data, DIM), path, row_group_size=20_000)
    paths = np.array([f"/data/img_{i}.jpg" for i in range(ids[-1] + 1)], dtype=object)[ids]

    def from_file(q):
        table = pq.read_table(path, filters=[("score", ">=", 0.5)])
        flat = table.column("feature").combine_chunks().flatten().to_numpy()
        feats = flat.reshape(-1, DIM)
        image_ids = table.column("image_id").to_numpy()
        image_paths = paths[image_ids]  # (the real path builds these strings per row too)
        rank_images(image_paths, boxes, scores, feats @ q, 10)

    def in_memory(q):
        rank_images(paths, boxes, scores, data @ q, 10)

    file_times = [_timed(lambda q=q: from_file(q)) for q in qs[:3]]
    memory_times = [_timed(lambda q=q: in_memory(q)) for q in qs[:10]]
    path.unlink()
    return float(np.median(file_times)), float(np.median(memory_times))


def tune_nprobe(index, qs, truth, cfg: IndexConfig, target: float = 0.95) -> tuple[int, float]:
    ivf = faiss.extract_index_ivf(index)
    recall = 0.0
    for nprobe in (4, 8, 16, 32, 64, 128, 256):
        ivf.nprobe = min(nprobe, ivf.nlist)
        _, found = index.search(qs, 10)
        recall = recall_at_10(truth, found)
        if recall >= target:
            return nprobe, recall
    return ivf.nprobe, recall


def run(n: int, hnsw_max: int, pq_min: int) -> list[dict]:
    rows = []
    data = features(n)
    qs = queries(data, 200)
    batch = qs[:100]

    started = time.perf_counter()
    flat = fill_index(make_index(IndexConfig(kind="flat"), DIM, n), data)
    build = time.perf_counter() - started
    _, truth = flat.search(qs, 10)
    p50, p99 = latencies(flat, qs[:50])
    rows.append(
        dict(n=n, kind="flat", build=build, mem=index_bytes(flat), p50=p50, p99=p99,
             batch=_timed(lambda: flat.search(batch, 10)), recall=1.0, note="exact")
    )  # fmt: skip

    kinds = [IndexConfig(kind="ivf", nlist=auto_nlist(n))]
    if n >= pq_min:
        kinds.append(IndexConfig(kind="ivf", nlist=auto_nlist(n), pq_m=32))
    if n <= hnsw_max:
        kinds.append(IndexConfig(kind="hnsw", hnsw_m=32, ef_construction=100, ef_search=64))
    for cfg in kinds:
        started = time.perf_counter()
        index = fill_index(make_index(cfg, DIM, n), data)
        build = time.perf_counter() - started
        set_search_params(index, cfg)
        if cfg.kind == "ivf":
            nprobe, _ = tune_nprobe(index, qs, truth, cfg)
            note = f"nlist {faiss.extract_index_ivf(index).nlist}, nprobe {nprobe}"
            name = "ivf-pq32" if cfg.pq_m else "ivf-flat"
        else:
            for ef in (32, 64, 128, 256, 512):
                index.hnsw.efSearch = ef
                if recall_at_10(truth, index.search(qs, 10)[1]) >= 0.95:
                    break
            note, name = f"M {cfg.hnsw_m}, efSearch {ef}", "hnsw"
        _, found = index.search(qs, 10)
        p50, p99 = latencies(index, qs[:100])
        rows.append(
            dict(n=n, kind=name, build=build, mem=index_bytes(index), p50=p50, p99=p99,
                 batch=_timed(lambda index=index: index.search(batch, 10)),
                 recall=recall_at_10(truth, found), note=note)
        )  # fmt: skip
        del index
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        from_file, in_memory = today_path(data, qs, Path(tmp))
    rows.append(
        dict(n=n, kind="today: psearch search", build=0.0, mem=data.nbytes, p50=from_file,
             p99=float("nan"), batch=float("nan"), recall=1.0,
             note=f"parquet read + matmul + rank_images; in memory alone {in_memory * 1e3:.1f} ms")
    )  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest N for HNSW")
    parser.add_argument("--pq-min", type=int, default=100_000, help="smallest N for IVF-PQ")
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    bandwidth = bandwidth_gbs()
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s (1 GiB float32 sum, best of 5)")
    header = "| N | index | build s | memory MiB | 1 query p50 ms | p99 ms | 100 queries ms | recall@10 | notes |"
    print(header)
    print("|" + " --- |" * 9)
    for n in args.sizes:
        rows = run(n, args.hnsw_max, args.pq_min)
        flat = rows[0]
        for r in rows:
            print(
                f"| {r['n']:,} | {r['kind']} | {r['build']:.2f} | {r['mem'] / 2**20:,.0f} | "
                f"{r['p50'] * 1e3:.2f} | {r['p99'] * 1e3:.2f} | {r['batch'] * 1e3:.1f} | "
                f"{r['recall']:.3f} | {r['note']} |"
            )
        scan = n * DIM * 4 / (bandwidth * 1e9)
        today = rows[-1]["p50"]
        print(
            f"N={n:,}: one read of the {n * DIM * 4 / 1e9:.2f} GB matrix at {bandwidth:.1f} GB/s "
            f"= {scan * 1e3:.2f} ms; exact p50 {flat['p50'] * 1e3:.2f} ms = "
            f"{flat['p50'] / scan:.2f}x that (target <= 1.5x); today's path "
            f"{today * 1e3:.0f} ms = {today / flat['p50']:.0f}x the exact index",
            file=sys.stderr,
        )
    print(f"peak RSS {rss_gib():.2f} GiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
