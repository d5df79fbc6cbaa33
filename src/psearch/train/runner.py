"""What pretrain and joint training share around the engine: the MLflow run, the
checkpoint fingerprint, and writing the output directory (model file + run.json)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from psearch.atomic import atomic_dir
from psearch.config import Params, to_dict
from psearch.train.distributed import DistContext
from psearch.train.engine import FitResult, MetricsFn

log = logging.getLogger(__name__)


@contextlib.contextmanager
def tracked_run(
    stage: str, params: Params, manifests: Path, seed: int, ctx: DistContext
) -> Iterator[Any]:
    """The stage's MLflow run on rank 0 (None on other ranks or with tracking disabled)."""
    if not ctx.is_main:
        yield None
        return
    from psearch.tracking import stage_run

    with stage_run(stage, params, manifests, seed=seed) as run:
        if run is not None:
            import mlflow

            mlflow.set_tag("psearch.world_size", str(ctx.world_size))
        yield run


def metrics_logger(run) -> MetricsFn | None:
    """Per-step metrics (losses, lr, images/s) into the active MLflow run."""
    if run is None:
        return None
    import mlflow

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        mlflow.log_metrics(finite, step=step)

    return log_metrics


def summary(result: FitResult) -> dict[str, float]:
    """Final metrics of a fit: the last epoch's mean losses/accuracies, steps and speed."""
    out = {f"final_{k}": round(v, 6) for k, v in sorted(result.metrics.items())}
    out["steps"] = result.steps
    out["resumed_from_step"] = result.resumed_from
    out["train_seconds"] = round(result.seconds, 2)
    out["images_per_s"] = round(result.images_per_second, 3)
    return out


def write_output(
    out: Path,
    file_name: str,
    model: nn.Module,
    meta: dict[str, Any],
    run,
    metrics: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write `out/<file_name>` and `out/run.json` atomically; log metrics and the model."""
    from psearch.models.io import log_model, save_model

    info: dict[str, Any] = {"run_id": run.info.run_id if run is not None else None}
    with atomic_dir(out) as tmp:
        save_model(tmp / file_name, model, meta)
        if run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            info["model_uri"], info["logged_model_uri"] = log_model(tmp / file_name, "model")
        info.update(extra)
        info.update(metrics)
        (tmp / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def model_meta(stage: str, params: Params, num_classes: int, result: FitResult) -> dict[str, Any]:
    return {
        "stage": stage,
        "num_classes": num_classes,
        "steps": result.steps,
        "seed": getattr(params, stage if stage == "pretrain" else "train").seed,
        "model": to_dict(params.model),
        "loss": to_dict(params.train.loss),
    }
