"""What the Kubeflow component bodies call inside their container.

A component body only translates KFP artifacts to paths and calls a
psearch.stages function; the few steps they share live here so that the bodies
stay a few lines each: the pipeline's `params_json` parameter (written from
typed Params at compile/submit time, read back into validated Params in every
task), the pipeline's MLflow parent run (a psearch.tracking.ParentRun found by
its `kfp.run_id` tag), the promotion decision, finding the shards' parts, the
raw dataset's digest (the cache key of the tasks that read the PVC) and where a
training task keeps its checkpoints so that a retry resumes.

The DAG (pipelines/) imports this package and never the other way round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psearch.config import Params, build_section, to_dict
from psearch.errors import PsearchError
from psearch.inference.shards import PART_PATTERN
from psearch.registry import champion_decision
from psearch.tracking import PARENT_RUN_ENV, ParentRun

# The tag that finds a Kubeflow run's MLflow parent run again in close-runs.
KFP_RUN_TAG = "kfp.run_id"
# KFP's final task states -> MLflow run statuses. The exit handler's PipelineTaskFinalStatus
# spells a cancelled run CANCELLED (kfp.dsl); the REST API's run states spell it CANCELED
# (and CANCELING while pods are being stopped): all of them mean the user killed the run.
MLFLOW_STATUS = {
    "SUCCEEDED": "FINISHED",
    "FAILED": "FAILED",
    "CANCELLED": "KILLED",
    "CANCELED": "KILLED",
    "CANCELING": "KILLED",
}


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
    check_tracking_uri(params)
    if pipeline_run_id:
        os.environ[PARENT_RUN_ENV] = pipeline_run_id
    return params


def check_tracking_uri(params: Params) -> None:
    """In the cluster the Secret's MLFLOW_TRACKING_URI names the tracking server, and its
    credentials (MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN) are for that server: a params
    file naming another one would send them there, so it is refused."""
    secret_uri = os.environ.get("MLFLOW_TRACKING_URI")
    asked = params.tracking.tracking_uri
    if secret_uri and asked and asked != secret_uri:
        raise PsearchError(
            f"tracking.tracking_uri: {asked!r} differs from the MLFLOW_TRACKING_URI this task "
            "was given (the cluster's Secret); remove it from the params, the Secret's server "
            "is the one its credentials are for"
        )


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
    status of the pipeline's final state (SUCCEEDED -> FINISHED, CANCELLED -> KILLED,
    anything else -> FAILED).
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


def tree_digest(root: str | Path) -> str:
    """A digest of the raw dataset under `root`: every file's relative path, size and
    modification time (not the bytes: the listing of a 50 GB PVC takes seconds, reading it
    minutes, on every run). It is the input that keys the cache of the tasks reading the PVC.
    """
    root = Path(root)
    if not root.is_dir():
        raise PsearchError(f"{root}: the dataset directory does not exist")
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()  # os.walk's order is the file system's; the digest must not be
        for name in sorted(files):
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError as exc:  # a dangling link, a file removed while listing
                raise PsearchError(f"{path}: cannot read ({exc.strerror})") from None
            line = f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
            digest.update(line.encode())
    return "sha256:" + digest.hexdigest()


def train_resumably(
    train: Callable[..., Any], stage: str, checkpoint_root: str, kfp_run_id: str, *args, **kwargs
) -> None:
    """Run a psearch.stages training function (pretrain, train) as a retried KFP task does:
    checkpoints in checkpoint_location, resuming from them, dropped once the model is out."""
    checkpoints = checkpoint_location(checkpoint_root, kfp_run_id, stage)
    summary = train(*args, resume=True, checkpoint_dir=checkpoints, **kwargs)
    drop_checkpoints(checkpoints)
    print(summary_line(stage, summary))


def checkpoint_location(root: str, kfp_run_id: str, stage: str) -> Path | None:
    """Where a training task keeps its checkpoints: ROOT/<KFP run id>/<stage> on the checkpoint
    PVC, the same for every retry of the task in that run, so a retry resumes. An empty `root`
    (no checkpoint PVC, or run-local) gives None: beside the output artifact, in the pod.
    """
    if not root:
        return None
    if not kfp_run_id:
        raise PsearchError(f"{stage}: a checkpoint root without a KFP run id")
    return Path(root) / kfp_run_id / stage


def drop_checkpoints(location: Path | None) -> None:
    """Remove a finished task's checkpoints (the model is in its output artifact now)."""
    if location is None:
        return
    shutil.rmtree(location, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another stage's checkpoints are there
        location.parent.rmdir()  # the run's directory, once its last stage is done
