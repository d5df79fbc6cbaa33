"""MLflow tracking: one run per stage execution, one parent run per pipeline execution.

- mlflow_runs: where runs go (the tracking URI) and what each carries (params,
  git revision, package versions, data version); the store's reachability.
- parent: ParentRun, the parent run of one pipeline execution, shared by the
  `dvc repro` record below and the Kubeflow pipeline (components.runtime).
- dvc_record: the execution record under .dvc/tmp that groups a `dvc repro`.
- stage: stage_run, the MLflow run of one stage (named, with its dataset input and
  system metrics: names, datasets).
"""

from psearch.tracking.dvc_record import (
    LAST_PIPELINE_RECORD,
    PIPELINE_RECORD,
    dvc_stage,
    finish_pipeline,
    pipeline_parent_run,
    read_record,
    stage_seconds,
)
from psearch.tracking.mlflow_runs import (
    DEFAULT_TRACKING_URI,
    PARENT_RUN_ENV,
    check_reachable,
    connect,
    data_version,
    git_revision,
    package_versions,
    tracking_uri,
)
from psearch.tracking.names import MODEL_SHA256_TAG, stage_metrics
from psearch.tracking.parent import ParentRun
from psearch.tracking.stage import stage_run

__all__ = [
    "DEFAULT_TRACKING_URI",
    "LAST_PIPELINE_RECORD",
    "MODEL_SHA256_TAG",
    "PARENT_RUN_ENV",
    "PIPELINE_RECORD",
    "ParentRun",
    "check_reachable",
    "connect",
    "data_version",
    "dvc_stage",
    "finish_pipeline",
    "git_revision",
    "package_versions",
    "pipeline_parent_run",
    "read_record",
    "stage_metrics",
    "stage_run",
    "stage_seconds",
    "tracking_uri",
]
