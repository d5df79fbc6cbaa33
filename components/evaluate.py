"""Evaluate: score the detections and features; metrics to KFP and MLflow."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

IMAGE = "cpu"


def evaluate(
    manifests: Input[Dataset],
    detections: Input[Dataset],
    params_json: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
) -> float:
    """Write metrics.json, per-query results and plots to `report`; log every metric
    (flattened, e.g. search.gallery_100.mAP) to `metrics`; return the value of the
    metric that decides promotion (register.metric)."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import decision_metric, stage_params, summary_line
    from psearch import stages
    from psearch.registry import read_metrics

    cfg = stage_params(params_json)
    summary = stages.evaluate(
        Path(manifests.path), Path(detections.path), Path(report.path), cfg.evaluate
    )
    print(summary_line("evaluate", summary))
    flat = read_metrics(Path(report.path) / "metrics.json")
    for name, value in flat.items():
        metrics.log_metric(name, value)
    return decision_metric(flat, cfg.register.metric)
