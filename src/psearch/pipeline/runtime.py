"""What the Kubeflow component bodies call inside their container.

A component body only translates KFP artifacts to paths and calls a
psearch.stages function; the few steps they share (rebuilding typed Params
from the pipeline's `params_json` parameter, the pipeline's MLflow run, the
promotion decision, finding the shards' parts) live here so that the bodies
stay a few lines each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from psearch.config import Params, _build, to_dict
from psearch.errors import PsearchError
from psearch.tracking import PARENT_RUN_ENV, check_reachable, tracking_uri


def params_tree(params: Params) -> dict[str, Any]:
    """The pipeline's `params_json` value for `params` (everything but the pipeline section)."""
    tree = to_dict(params)
    tree.pop("pipeline", None)
    return tree


def stage_params(params_json: str, pipeline_run_id: str = "") -> Params:
    """Validated Params from the pipeline's `params_json` parameter.

    Also makes the stage's MLflow run a child of the pipeline's run (when there
    is one) through the variable psearch.tracking reads.
    """
    try:
        tree = json.loads(params_json)
    except ValueError as exc:
        raise PsearchError(f"pipeline parameter params_json: not valid JSON ({exc})") from None
    try:
        params = _build(Params, tree)
    except PsearchError as exc:
        raise PsearchError(f"pipeline parameter params_json: {exc}") from None
    if pipeline_run_id:
        os.environ[PARENT_RUN_ENV] = pipeline_run_id
    return params


def open_pipeline_run(params: Params, kfp_run_id: str, kfp_run_name: str) -> str:
    """Create the MLflow run that groups this pipeline execution's stage runs; return its id.

    Returns "" when tracking is disabled; the stages then track nothing either.
    """
    if not params.tracking.enabled:
        return ""
    import mlflow
    from mlflow.entities import Param

    from psearch.config import flatten
    from psearch.tracking import check_reachable, git_revision, package_versions

    uri = tracking_uri(params.tracking)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(params.tracking.experiment)
    tags = {
        "psearch.stage": "pipeline",
        "psearch.runner": "kubeflow",
        "psearch.git_revision": git_revision(),
        "kfp.run_id": kfp_run_id,
        "kfp.run_name": kfp_run_name,
        **{f"psearch.version.{k}": v for k, v in package_versions().items()},
    }
    client = mlflow.MlflowClient()
    run = client.create_run(experiment.experiment_id, run_name=kfp_run_name, tags=tags)
    logged = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for start in range(0, len(logged), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=logged[start : start + 100])
    return run.info.run_id


# KFP's final task states -> MLflow run statuses.
MLFLOW_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELED": "KILLED"}


def close_pipeline_runs(params: Params, kfp_run_id: str, state: str) -> list[str]:
    """End this pipeline execution's MLflow runs that are still RUNNING; return their ids.

    Run by the pipeline's exit handler whatever happened: the parent run (found by its
    `kfp.run_id` tag) and any stage run under it that a killed pod left RUNNING get the
    status of the pipeline's final state (SUCCEEDED -> FINISHED, FAILED -> FAILED,
    CANCELED -> KILLED).
    """
    if not params.tracking.enabled:
        return []
    import mlflow

    uri = tracking_uri(params.tracking)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        return []
    status = MLFLOW_STATUS.get(state.upper(), "FAILED")
    ids = [experiment.experiment_id]
    parents = client.search_runs(ids, filter_string=f"tags.`kfp.run_id` = '{kfp_run_id}'")
    closed = []
    for parent in parents:
        children = client.search_runs(
            ids, filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        for run in [*children, parent]:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status=status)
                closed.append(run.info.run_id)
    return closed


def beats_champion(params: Params, version: str) -> tuple[bool, str]:
    """Whether registered `version` beats the champion, by `psearch promote`'s own rule.

    A champion without the metric is not replaced automatically (that is what
    `psearch promote --force` is for), so here it is a "no" with the reason.
    """
    from psearch.registry import champion_decision

    try:
        return champion_decision(params, version)
    except PsearchError as exc:
        return False, f"not promoted: {exc}"


def shard_parts(artifacts: list[str | Path]) -> list[Path]:
    """The part directory inside each extraction-shard artifact (one per artifact).

    A sharded extraction writes OUT/part-00I-of-00N/; in the pipeline every
    shard has its own OUT, the task's output artifact.
    """
    from psearch.inference.shards import PART_PATTERN

    parts = []
    for artifact in artifacts:
        found = sorted(Path(artifact).glob(PART_PATTERN))
        if len(found) != 1:
            raise PsearchError(f"{artifact}: expected one extraction part, found {len(found)}")
        parts.append(found[0])
    return parts


def decision_metric(metrics: dict[str, float], name: str) -> float:
    """The value of the metric that decides promotion (register.metric)."""
    if name not in metrics:
        raise PsearchError(
            f"register.metric: {name!r} is not in metrics.json (has: {', '.join(sorted(metrics))})"
        )
    return metrics[name]


def summary_line(stage: str, summary: Any) -> str:
    """A stage's returned summary as one JSON log line (paths and numpy scalars as text)."""
    return f"psearch {stage}: " + json.dumps(summary, default=str, sort_keys=True)
