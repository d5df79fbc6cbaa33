"""What the Kubeflow component bodies call inside their container.

A component body only translates KFP artifacts to paths and calls a
psearch.stages function; the few steps they share live here so that the bodies
stay a few lines each: the pipeline's `params_json` parameter (written from
typed Params at compile/submit time, read back into validated Params in every
task), the pipeline's MLflow parent run (a psearch.tracking.ParentRun found by
its `kfp.run_id` tag), the promotion decision, and finding the shards' parts.

The DAG (pipelines/) imports this package and never the other way round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from psearch.config import Params, build_section, to_dict
from psearch.errors import PsearchError
from psearch.inference.shards import PART_PATTERN
from psearch.registry import champion_decision
from psearch.tracking import PARENT_RUN_ENV, ParentRun

# The tag that finds a Kubeflow run's MLflow parent run again in close-runs.
KFP_RUN_TAG = "kfp.run_id"
# KFP's final task states -> MLflow run statuses.
MLFLOW_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELED": "KILLED"}


def params_tree(params: Params) -> dict[str, Any]:
    """The params the tasks get: every section but `pipeline` (that one shapes the DAG)."""
    tree = to_dict(params)
    tree.pop("pipeline", None)
    return tree


def params_json(params: Params) -> str:
    """The pipeline's `params_json` value for `params` (read back by stage_params)."""
    return json.dumps(params_tree(params), sort_keys=True)


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
        params = build_section(Params, tree)
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
    tags = {KFP_RUN_TAG: kfp_run_id, "kfp.run_name": kfp_run_name}
    return ParentRun.create(params, "kubeflow", label=kfp_run_name, tags=tags).run_id


def close_pipeline_runs(params: Params, kfp_run_id: str, state: str) -> list[str]:
    """End this pipeline execution's MLflow runs that are still RUNNING; return their ids.

    Run by the pipeline's exit handler whatever happened: the parent run (found by its
    `kfp.run_id` tag) and any stage run under it that a killed pod left RUNNING get the
    status of the pipeline's final state (SUCCEEDED -> FINISHED, FAILED -> FAILED,
    CANCELED -> KILLED).
    """
    if not params.tracking.enabled:
        return []
    status = MLFLOW_STATUS.get(state.upper(), "FAILED")
    return [
        run_id
        for parent in ParentRun.find(params, KFP_RUN_TAG, kfp_run_id)
        for run_id in parent.finish(status)
    ]


def beats_champion(params: Params, version: str) -> tuple[bool, str]:
    """Whether registered `version` beats the champion, by `psearch promote`'s own rule.

    A champion without the metric is not replaced automatically (that is what
    `psearch promote --force` is for), so here it is a "no" with the reason.
    """
    try:
        return champion_decision(params, version)
    except PsearchError as exc:
        return False, f"not promoted: {exc}"


def shard_parts(artifacts: list[str | Path]) -> list[Path]:
    """The part directory inside each extraction-shard artifact (one per artifact).

    A sharded extraction writes OUT/part-00I-of-00N/; in the pipeline every
    shard has its own OUT, the task's output artifact.
    """
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
