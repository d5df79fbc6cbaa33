"""The tiny preset with the least training that still exercises every stage of the Kubeflow
DAG: the overrides the kfp.local tests (subprocess and containers runners) share."""

from __future__ import annotations


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
