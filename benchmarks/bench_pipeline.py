"""Kubeflow pipeline figures: compile time and IR size; with --run-local, the whole DAG
through kfp.local on the tiny preset (minimal training) and the time of each task.

    .venv/bin/python benchmarks/bench_pipeline.py [--run-local]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from pipelines.compile import compile_pipeline
from pipelines.local import run_local
from psearch.config import load_params

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "pretrain.epochs=1", "pretrain.max_steps=2", "pretrain.num_workers=0",
    "train.epochs=1", "train.max_steps=2", "train.num_workers=0", "extract.num_workers=0",
    "model.min_size=96", "model.max_size=160", "model.rpn_pre_nms_top_n_test=200",
    "model.rpn_post_nms_top_n_test=50", "pipeline.extract_shards=2",
]  # fmt: skip


def bench_compile(repeats: int = 5) -> None:
    params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.yaml"
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            compile_pipeline(params, out)
            times.append(time.perf_counter() - start)
        spec = next(yaml.safe_load_all(out.read_text()))
        executors = len(spec["deploymentSpec"]["executors"])
        print(f"compile: median {statistics.median(times) * 1000:.0f} ms over {repeats} "
              f"(first {times[0] * 1000:.0f} ms); IR {out.stat().st_size / 1024:.1f} KiB, "
              f"{executors} components")  # fmt: skip


def bench_run_local() -> None:
    params = load_params(REPO / "params.yaml", QUICK)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        result = run_local(params, Path(tmp) / "work")
        total = time.time() - start
        run_dir = Path(result["run_dir"])
        done = sorted(
            (p.stat().st_mtime, str(p.parent.relative_to(run_dir)))
            for p in run_dir.glob("**/executor_output.json")
        )
        metrics = json.loads(Path(result["metrics"]).read_text())
    print(f"run-local (tiny, 2 train steps, 2 shards): {total:.0f} s wall, "
          f"{len(done)} tasks; gallery_100 mAP {metrics['search']['gallery_100']['mAP']:.3f}")  # fmt: skip
    # Synthesising the dataset comes first; then each task's end, from the run's start.
    for finished, task in done:
        print(f"  {task:<40} done at {finished - start:6.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-local", action="store_true", help="also run the DAG (minutes)")
    args = parser.parse_args()
    bench_compile()
    if args.run_local:
        bench_run_local()


if __name__ == "__main__":
    main()
