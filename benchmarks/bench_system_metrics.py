"""What MLflow's system metrics cost a training stage (psearch.tracking.stage samples them).

Two figures, in a temporary SQLite store:
1. the monitor's own cost: the process's CPU time while an otherwise idle run is open for
   `--seconds` with sampling every `--interval` seconds, per sample (psutil reads, the
   GPU's through NVML when there is one, and one batch write to the store), and what that
   is as a share of one core at psearch's interval (SYSTEM_METRICS_INTERVAL);
2. the slow-down of real work: a fixed number of tiny-preset training steps of the joint
   net (psearch's engine, in a tracked run, one torch thread), with sampling off and on,
   alternated `--repeats` times: the medians of the process's CPU seconds (what sampling
   adds, little swayed by other load) and of the fit's wall seconds (the
   stage's returned train_seconds; on a shared machine other load dominates it).

Usage: python benchmarks/bench_system_metrics.py [--seconds 20] [--interval 0.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def monitor_cost(store: str, seconds: float, interval: float) -> dict:
    """CPU seconds per sample of an idle run with system metrics on."""
    import mlflow

    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("bench-system-metrics")
    mlflow.set_system_metrics_sampling_interval(interval)
    idle = _cpu_while_open(seconds, system_metrics=False)
    busy = _cpu_while_open(seconds, system_metrics=True)
    client = mlflow.MlflowClient(store)
    samples = len(client.get_metric_history(busy["run_id"], "system/cpu_utilization_percentage"))
    per_sample = (busy["cpu"] - idle["cpu"]) / max(samples, 1)
    return {"samples": samples, "cpu_per_sample_ms": per_sample * 1000}


def _cpu_while_open(seconds: float, system_metrics: bool) -> dict:
    import mlflow

    start = time.process_time()
    with mlflow.start_run(log_system_metrics=system_metrics) as run:
        time.sleep(seconds)
    return {"cpu": time.process_time() - start, "run_id": run.info.run_id}


def training_slowdown(store: str, repeats: int, interval: float, workdir: Path) -> dict:
    """Median CPU and fit seconds of the same tiny training, sampling off vs on."""
    import warnings

    import torch

    from psearch import stages
    from psearch.config import load_params
    from psearch.data.ingest import ingest
    from psearch.synth import synthesize

    synthesize(workdir / "data", preset="tiny", seed=0)
    ingest(workdir / "data", workdir / "manifests", fmt="cuhk-sysu")
    overrides = [
        f"tracking.tracking_uri={store}",
        "tracking.experiment=bench-system-metrics",
        "model.min_size=150",
        "model.max_size=200",
        "model.rpn_post_nms_top_n_train=64",
        "model.roi_batch_size_per_image=64",
        "train.num_workers=0",
        "train.epochs=100",
        "train.max_steps=30",
        "train.checkpoint_every=1000",
    ]
    params = load_params(None, overrides)
    warnings.filterwarnings("ignore", "train: no --init given")  # the speed is what counts here
    torch.set_num_threads(1)  # one core's work: comparable whatever else the machine runs
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(interval)
    for repeat in range(repeats):
        for mode in ("off", "on"):
            os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "true" if mode == "on" else "false"
            out = workdir / f"train-{mode}-{repeat}"
            started = time.process_time()
            info = stages.train(workdir / "manifests", out, params)
            cpu[mode].append(time.process_time() - started)
            times[mode].append(info["train_seconds"])
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    cpu_off, cpu_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    return {
        "off_s": off,
        "on_s": on,
        "cpu_off_s": cpu_off,
        "cpu_on_s": cpu_on,
        "cpu_pct": 100 * (cpu_on - cpu_off) / cpu_off,
        "runs": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="idle run length")
    parser.add_argument("--interval", type=float, default=0.5, help="sampling interval (s)")
    parser.add_argument("--repeats", type=int, default=5, help="training runs per mode")
    args = parser.parse_args()

    from psearch.tracking.stage import SYSTEM_METRICS_INTERVAL

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # MLflow's default artifact root is relative to the working directory
        store = f"sqlite:///{tmp}/mlflow.db"
        cost = monitor_cost(store, args.seconds, args.interval)
        share = cost["cpu_per_sample_ms"] / 1000 / SYSTEM_METRICS_INTERVAL * 100
        print(
            f"monitor: {cost['samples']} samples in {args.seconds:.0f} s at {args.interval} s: "
            f"{cost['cpu_per_sample_ms']:.1f} ms CPU per sample -> "
            f"{share:.3f} % of one core at psearch's {SYSTEM_METRICS_INTERVAL:.0f} s interval"
        )
        slow = training_slowdown(store, args.repeats, args.interval, Path(tmp))
        print(
            f"tiny training, 30 steps, sampling every {args.interval} s "
            f"(medians of {args.repeats}): CPU off {slow['cpu_off_s']:.2f} s, "
            f"on {slow['cpu_on_s']:.2f} s ({slow['cpu_pct']:+.1f} %); "
            f"fit wall off {slow['off_s']:.2f} s, on {slow['on_s']:.2f} s"
        )
        print("fit wall s:", {k: [round(v, 2) for v in vs] for k, vs in slow["runs"].items()})


if __name__ == "__main__":
    main()
