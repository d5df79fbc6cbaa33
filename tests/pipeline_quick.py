"""The tiny preset with the least training that still exercises every stage of the Kubeflow
DAG: the overrides the kfp.local tests (subprocess and containers runners) share."""

from __future__ import annotations

import json
from pathlib import Path


def quick_overrides(experiment: str) -> list[str]:
    """`--set` overrides for a quick DAG run logged to MLflow experiment `experiment`."""
    return [
        "pretrain.epochs=1",
        "pretrain.max_steps=2",
        "pretrain.num_workers=0",
        "train.epochs=1",
        "train.max_steps=2",
        "train.num_workers=0",
        "extract.num_workers=0",
        "model.min_size=96",
        "model.max_size=160",
        "model.rpn_pre_nms_top_n_test=200",
        "model.rpn_post_nms_top_n_test=50",
        "pipeline.extract_shards=2",
        f"tracking.experiment={experiment}",
    ]


def assert_index_and_metrics(run_dir: Path, result: dict) -> dict:
    """A DAG run's gallery index and metrics are there; returns the metrics."""
    index = json.loads((run_dir / "index" / "executor_output.json").read_text())
    index_dir = Path(index["artifacts"]["gallery_index"]["artifacts"][0]["uri"])
    assert (index_dir / "index.json").is_file()
    metrics = json.loads(Path(result["metrics"]).read_text())
    assert set(metrics) == {"search", "detection"}
    assert {"gallery_50", "gallery_100", "occlusion", "low_resolution"} <= set(metrics["search"])
    return metrics
