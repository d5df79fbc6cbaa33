"""Ingest at CUHK-SYSU scale: `psearch ingest` over the synthetic `full` preset.

Synthesises `full` once (cached, default /tmp/psearch-bench/full-seed0; set
PSEARCH_BENCH_CACHE to move it), then times `psearch ingest` in a subprocess
and reads its peak memory from resource.getrusage(RUSAGE_CHILDREN). Each
command runs under its own small wrapper process, so the synthesis and the
ingest peaks are reported separately. Target: ingest <= 60 s and <= 8 GB on 2 cores.

    .venv/bin/python benchmarks/bench_ingest.py [--fresh]

`--decode-cost` times only what decoding every image in full adds to reading its header, over
the full preset's 18,184 images (the tiny preset's 160 files, 200 x 150 px, each read ~114
times: the full preset's are 160 x 120), without synthesising `full`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("PSEARCH_BENCH_CACHE", "/tmp/psearch-bench/full-seed0"))
PSEARCH = [sys.executable, "-m", "psearch.cli"]


def _child(cmd: list[str]) -> int:
    """Run `cmd`, then print its wall time and peak RSS as JSON (wrapper mode)."""
    start = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ru_maxrss is in KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime
    print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": cpu, "peak_gib": usage.ru_maxrss / 2**20}))
    return rc


def measure(cmd: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *cmd], capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"command failed ({result['rc']}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return result


def decode_cost() -> None:
    """Wall and CPU seconds of header-only reads vs ingest's full decode, 18,184 images."""
    # lazy: only this mode needs the library in-process.
    import numpy as np
    from PIL import Image

    from psearch.data.ingest import image_sizes
    from psearch.synth import synthesize

    def headers(root: Path, paths: list[str]) -> np.ndarray:
        sizes = np.empty((len(paths), 2), dtype=np.int32)
        for i, rel in enumerate(paths):
            with Image.open(root / rel) as image:
                sizes[i] = image.size
        return sizes

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        root = Path(tmp) / "tiny"
        synthesize(root, preset="tiny", seed=0)
        files = sorted(str(p.relative_to(root)) for p in (root / "Image" / "SSM").iterdir())
        paths = [files[i % len(files)] for i in range(18184)]
        for name, read in (("header only", headers), ("full decode", image_sizes)) * 2:
            wall, cpu = time.perf_counter(), time.process_time()
            read(root, paths)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU for {len(paths)} images")


def main() -> None:
    if "--fresh" in sys.argv and CACHE.exists():
        shutil.rmtree(CACHE)
    synth = None
    if not (CACHE / "annotation" / "Images.mat").is_file():
        synth = measure([*PSEARCH, "synth", "--out", str(CACHE), "--preset", "full", "--seed", "0"])
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        out = Path(tmp) / "manifests"
        run = measure(
            [*PSEARCH, "ingest", "--format", "cuhk-sysu", "--root", str(CACHE), "--out", str(out)]
        )
        info = json.loads((out / "dataset.json").read_text())
    counts = info["counts"]
    size_gib = sum(p.stat().st_size for p in (CACHE / "annotation").rglob("*.mat")) / 2**30
    print(
        f"dataset: {CACHE} ({counts['images']} images, {counts['boxes']} boxes, "
        f"{counts['persons']} persons, {counts['queries']} queries, "
        f"{counts['galleries']} gallery rows over sizes {info['gallery_sizes']}, "
        f"annotation files {size_gib:.2f} GiB on disk)"
    )
    if synth:
        print(
            f"synth full: {synth['wall_s']:.1f} s wall, {synth['cpu_s']:.1f} s CPU, "
            f"peak RSS {synth['peak_gib']:.2f} GiB"
        )
    else:
        print("synth full: cached (run with --fresh to time it)")
    print(
        f"ingest full: {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU, "
        f"peak RSS {run['peak_gib']:.2f} GiB (target <= 60 s, <= 8 GiB on {os.cpu_count()} cores)"
    )
    load = os.getloadavg()[0]
    print(f"load average after the run: {load:.1f} (other work on the machine stretches wall time)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    if "--decode-cost" in sys.argv:
        decode_cost()
    else:
        main()
