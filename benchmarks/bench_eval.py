"""Benchmark `psearch evaluate` against the plain reference loop (tests/eval_reference.py).

Data: the `full` synthetic preset (CUHK-SYSU sizes: 6,978 test images, 2,900 queries,
galleries 50..4000), ingested, with generated detections (~6 per test image, 256-d
features); built once and cached under $PSEARCH_BENCH_DIR (default /tmp/psearch_bench/eval).

Prints: the whole `psearch evaluate` process (all six protocols, both subsets,
detection, plots) wall time and peak memory; the in-process stage time; and the
reference loop's time, measured on a sample of queries per protocol and scaled to
all queries (said so in the output), with the agreement on that sample; and the in-process
time with CBGM re-ranking (`evaluate.cbgm`) on, beside it.

    .venv/bin/python benchmarks/bench_eval.py [--manifests DIR] [--sample 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from eval_reference import (  # noqa: E402
    fake_detections,
    gallery_candidates,
    reference_detection,
    reference_search,
)

from psearch.config import EvaluateConfig  # noqa: E402
from psearch.data.manifest import read_manifests, write_parquet  # noqa: E402
from psearch.evaluation.run import evaluate  # noqa: E402

PSEARCH = str(Path(sys.executable).with_name("psearch"))


def _prepare(cache: Path, manifests: Path | None) -> tuple[Path, Path]:
    if manifests is None:
        manifests = cache / "manifests"
        if not manifests.is_dir():
            raw = cache / "raw"
            if not raw.is_dir():
                subprocess.run([PSEARCH, "synth", "--out", raw, "--preset", "full"], check=True)
            subprocess.run(
                [PSEARCH, "ingest", "--format", "cuhk-sysu", "--root", raw, "--out", manifests],
                check=True,
            )
    detections = cache / "detections"
    if not (detections / "query_features.parquet").is_file():
        m = read_manifests(manifests)
        rng = np.random.default_rng(0)
        dets, qfeats = fake_detections(m.images, m.boxes, m.queries, rng, dim=256, per_image=6)
        write_parquet(dets, detections / "gallery_detections.parquet")
        write_parquet(qfeats, detections / "query_features.parquet")
    return manifests, detections


def _reference(manifests: Path, detections: Path, sizes: list[int], sample: int, n_queries: int):
    """Seconds the reference loop would take for every protocol and all queries, estimated
    from `sample` queries per protocol, plus the largest AP difference seen on the sample."""
    m = read_manifests(manifests)
    dets = pq.read_table(detections / "gallery_detections.parquet")
    qfeats = pq.read_table(detections / "query_features.parquet")
    only = set(
        np.random.default_rng(1)
        .choice(m.queries["query_id"].to_numpy(), sample, replace=False)
        .tolist()
    )
    per_query = pq.read_table(Path(os.environ["BENCH_EVAL_OUT"]) / "per_query.parquet").to_pylist()
    ours = {(r["protocol"], r["query_id"]): r for r in per_query}
    mask = np.isin(m.galleries["query_id"].to_numpy(), list(only))
    galleries = m.galleries.filter(mask)
    t0 = time.perf_counter()
    candidates = gallery_candidates(dets, 0.5)  # the loop's set-up, counted once
    total, worst = time.perf_counter() - t0, 0.0
    for size in sizes:
        chosen = galleries.filter(pc.equal(galleries["gallery_size"], size))
        t0 = time.perf_counter()
        expected = reference_search(
            m.images, m.queries, chosen, dets, qfeats, size, only=only, candidates=candidates
        )
        per = (time.perf_counter() - t0) / len(only)
        total += per * n_queries
        for qid, (ap, rank, _, _) in expected.items():
            row = ours[(f"gallery_{size}", qid)]
            worst = max(worst, abs(row["ap"] - ap))
            assert (row["rank"] or 0) == rank, (size, qid)
        print(f"  reference gallery_{size}: {per * 1000:.0f} ms/query")
    t0 = time.perf_counter()
    det = reference_detection(m.images, m.boxes, dets)
    total += time.perf_counter() - t0
    return total, worst, det


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", type=Path, help="use these manifests (default: synth full)")
    parser.add_argument("--sample", type=int, default=8, help="queries per protocol for the loop")
    args = parser.parse_args()
    cache = Path(os.environ.get("PSEARCH_BENCH_DIR", "/tmp/psearch_bench/eval"))
    manifests, detections = _prepare(cache, args.manifests)
    m = read_manifests(manifests)
    n_dets = pq.ParquetFile(detections / "gallery_detections.parquet").metadata.num_rows
    sizes = sorted({int(s) for s in m.galleries["gallery_size"].to_pylist()})
    print(
        f"data: {len(m.queries)} queries, {pc.sum(pc.equal(m.images['split'], 'test')).as_py()} test "
        f"images, {n_dets} detections, {len(m.galleries)} gallery rows, sizes {sizes}"
    )

    out = cache / "out"
    t0 = time.perf_counter()
    cmd = [PSEARCH, "evaluate", "--manifests", manifests, "--detections", detections, "--out", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    process = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    metrics = json.loads((out / "metrics.json").read_text())

    t0 = time.perf_counter()
    evaluate(manifests, detections, cache / "out_inproc", EvaluateConfig(plots=False))
    stage = time.perf_counter() - t0
    t0 = time.perf_counter()
    cbgm = evaluate(
        manifests, detections, cache / "out_cbgm", EvaluateConfig(plots=False, cbgm=True)
    )
    cbgm_stage = time.perf_counter() - t0

    os.environ["BENCH_EVAL_OUT"] = str(out)
    reference, worst, det = _reference(manifests, detections, sizes, args.sample, len(m.queries))
    det_diff = max(abs(metrics["detection"][k] - v) for k, v in det.items())
    print(
        f"psearch evaluate (whole process, {len(sizes)} protocols + subsets + detection + plots): "
        f"{process:.2f} s wall, {cpu:.2f} s CPU, peak RSS {peak:.0f} MiB"
    )
    print(f"evaluate() in-process, no PNGs: {stage:.2f} s")
    g100 = [m["search"].get("gallery_100", {}).get("mAP", float("nan")) for m in (metrics, cbgm)]
    print(
        f"evaluate() in-process with CBGM: {cbgm_stage:.2f} s (+{cbgm_stage - stage:.2f} s); "
        f"gallery_100 mAP {g100[0]:.4f} -> {g100[1]:.4f} (random features: no real context)"
    )
    print(
        f"reference loop (search scaled from {args.sample} queries/protocol to {len(m.queries)}; "
        f"detection measured in full): {reference:.0f} s"
    )
    print(
        f"speed-up vs loop: {reference / process:.0f}x (whole process), {reference / stage:.0f}x (in-process)"
    )
    print(f"agreement on the sample: max |dAP| {worst:.2e}; detection max diff {det_diff:.2e}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")
    print(
        f"gallery_100 mAP {metrics['search'].get('gallery_100', {}).get('mAP', float('nan')):.4f}"
    )


if __name__ == "__main__":
    main()
