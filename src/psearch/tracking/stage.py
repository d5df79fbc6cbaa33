"""The MLflow run of one stage execution, tagged so that it can be reproduced.

A stage run carries the flattened params, the seed, the data version, the git
revision and the package versions, and becomes the child of its pipeline's
parent run: the one named by $PSEARCH_PARENT_RUN_ID (set by a Kubeflow
component), else the current `dvc repro` execution's (psearch.tracking.dvc_record).
It is named for what it is (psearch.tracking.names), logs the manifests it read as a
dataset input (psearch.tracking.datasets) and, for the stages that keep the machine
busy, samples CPU, memory and GPU use through MLflow's system metrics (`system/...`),
every SYSTEM_METRICS_INTERVAL seconds unless $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
says otherwise; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from psearch.config import Params
from psearch.tracking.datasets import log_manifests_input
from psearch.tracking.dvc_record import note_stage_run, pipeline_parent_run
from psearch.tracking.mlflow_runs import (
    PARENT_RUN_ENV,
    data_version,
    log_params,
    open_experiment,
    provenance_tags,
)
from psearch.tracking.names import stage_run_name
from psearch.tracking.parent import ParentRun

# Seconds between system-metrics samples: each sample is one small batch write to the
# store, negligible at this rate (benchmarks/bench_system_metrics.py measures it).
SYSTEM_METRICS_INTERVAL = 10.0
SYSTEM_METRICS_SWITCH_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
SYSTEM_METRICS_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"


def system_metrics_wanted() -> bool:
    """System metrics unless MLflow's own switch turns them off."""
    return os.environ.get(SYSTEM_METRICS_SWITCH_ENV, "true").strip().lower() not in {
        "false",
        "0",
        "no",
    }


def _sample_every() -> None:
    """Our interval, unless MLflow's own variable sets one."""
    import mlflow  # lazy: seconds to import, and `psearch --help` imports this package

    if not os.environ.get(SYSTEM_METRICS_INTERVAL_ENV):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    manifests: str | Path | None = None,
    seed: int | None = None,
    extra_tags: dict[str, str] | None = None,
    *,
    split: str | None = None,
    system_metrics: bool = False,
    name_detail: str = "",
) -> Iterator[Any]:
    """An MLflow run for one stage, with params and reproducibility tags; yields the run.

    `split` (train or test): the part of `manifests` the stage reads, the context of its
    dataset input. `system_metrics`: sample the machine's use while the run is open.
    `name_detail`: what the run name says between the stage and the data digest.
    Yields None when tracking is disabled (`tracking.enabled: false`).
    """
    if not params.tracking.enabled:
        yield None
        return
    import mlflow  # lazy: seconds to import, and `psearch --help` imports this package

    client, _ = open_experiment(params)
    tags = {
        "psearch.stage": stage,
        "psearch.data_version": data_version(manifests),
        "psearch.seed": str(seed if seed is not None else ""),
        **provenance_tags(),
        **(extra_tags or {}),
    }
    parent = os.environ.get(PARENT_RUN_ENV) or pipeline_parent_run(params)
    if parent:
        tags["mlflow.parentRunId"] = parent
    version = tags["psearch.data_version"]
    name = stage_run_name(stage, params, version, name_detail)
    sample = system_metrics and system_metrics_wanted()
    if sample:
        _sample_every()
    # None: MLflow decides from its own switch (off unless a user turned it on).
    with mlflow.start_run(run_name=name, tags=tags, log_system_metrics=sample or None) as run:
        log_params(client, run.info.run_id, params)
        if split:
            log_manifests_input(manifests, version, split)
        if parent and tags["psearch.data_version"] != "unknown":
            # The pipeline run learns the data version from the first stage that reads data.
            ParentRun(client, parent).note_data_version(tags["psearch.data_version"])
        yield run
    note_stage_run(stage, run.info.run_id)
