"""The MLflow run of one stage execution, tagged so that it can be reproduced.

A stage run carries the flattened params, the seed, the data version, the git
revision and the package versions, and becomes the child of its pipeline's
parent run: the one named by $PSEARCH_PARENT_RUN_ID (set by a Kubeflow
component), else the current `dvc repro` execution's (psearch.tracking.dvc_record).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from psearch.config import Params
from psearch.tracking.dvc_record import note_stage_run, pipeline_parent_run
from psearch.tracking.mlflow_runs import (
    PARENT_RUN_ENV,
    data_version,
    log_params,
    open_experiment,
    provenance_tags,
)
from psearch.tracking.parent import ParentRun


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    manifests: str | Path | None = None,
    seed: int | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage, with params and reproducibility tags; yields the run.

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
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        log_params(client, run.info.run_id, params)
        if parent and tags["psearch.data_version"] != "unknown":
            # The pipeline run learns the data version from the first stage that reads data.
            ParentRun(client, parent).note_data_version(tags["psearch.data_version"])
        yield run
    note_stage_run(stage, run.info.run_id)
