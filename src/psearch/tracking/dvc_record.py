"""One MLflow parent run per `dvc repro` execution, through a record under .dvc/tmp.

DVC runs each stage's command in a fresh process and has no hook around a
whole `dvc repro`, so the stages of one execution find each other through a
small record file in DVC's scratch directory (.dvc/tmp, never committed):
- the CLI notes every stage's start and end there (`dvc_stage`; no MLflow
  import, so it costs nothing for stages that do not track);
- the first stage that opens an MLflow run creates the execution's parent run
  and stores its id there (`pipeline_parent_run`);
- the `register` stage, the last one, closes the execution (`finish_pipeline`):
  stages without an MLflow run of their own (synth, ingest, extract, evaluate)
  get a child run carrying their recorded times, the parent run ends, and the
  record is kept as psearch-pipeline-last.json (the demo prints its timings).
A stage that already finished in the open record starts a new execution; a
killed stage never finished, so `dvc repro` after a kill continues the same
execution and the same parent run. The parent run itself is a
psearch.tracking.parent.ParentRun, as under Kubeflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from psearch.atomic import write_text_atomic
from psearch.config import Params
from psearch.tracking.mlflow_runs import connect, tracking_uri
from psearch.tracking.parent import ParentRun

PIPELINE_RECORD = "psearch-pipeline.json"
LAST_PIPELINE_RECORD = "psearch-pipeline-last.json"


def _record_path(name: str = PIPELINE_RECORD) -> Path | None:
    """The execution record when this process is a stage run by DVC, else None."""
    root = os.environ.get("DVC_ROOT")
    if not root or not os.environ.get("DVC_STAGE"):
        return None
    return Path(root) / ".dvc" / "tmp" / name


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "execution" in record else None


def _open_record() -> tuple[Path | None, dict[str, Any] | None]:
    path = _record_path()
    return path, (read_record(path) if path else None)


def _write_record(path: Path, record: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _new_record(previous: dict[str, Any] | None) -> dict[str, Any]:
    stale = list((previous or {}).get("stale_parents", []))
    if previous and previous.get("parent_run_id"):
        stale.append([previous["parent_run_id"], previous.get("tracking_uri")])
    return {
        "execution": uuid.uuid4().hex,
        "started_ms": _now_ms(),
        "parent_run_id": None,
        "tracking_uri": None,
        "stale_parents": stale,
        "stages": {},
    }


@contextlib.contextmanager
def dvc_stage(command: str) -> Iterator[None]:
    """Note a stage's start and end in the execution record when DVC runs it (else nothing)."""
    path = _record_path()
    if path is None:
        yield
        return
    stage = os.environ["DVC_STAGE"]
    record = read_record(path)
    if record is None or record["stages"].get(stage, {}).get("end_ms") is not None:
        record = _new_record(record)  # no open execution, or this stage already ran in it
    record["stages"][stage] = {"command": command, "start_ms": _now_ms(), "end_ms": None}
    _write_record(path, record)
    execution = record["execution"]
    yield
    record = read_record(path)
    if record is None or record["execution"] != execution:
        return  # the register stage closed the execution itself
    record["stages"][stage]["end_ms"] = _now_ms()
    _write_record(path, record)


def _close_stale_parents(client: Any, record: dict[str, Any], uri: str) -> None:
    """End the parent runs of executions that never reached `register`."""
    keep = []
    for run_id, run_uri in record.get("stale_parents", []):
        if run_uri != uri:
            keep.append([run_id, run_uri])
            continue
        with contextlib.suppress(Exception):  # already deleted: nothing to do
            ParentRun(client, run_id).finish("FINISHED")
    record["stale_parents"] = keep


def _ensure_parent(record: dict[str, Any], params: Params) -> ParentRun:
    """The execution's parent run in the params' store, created on first use."""
    uri = tracking_uri(params.tracking)
    if record.get("parent_run_id") and record.get("tracking_uri") == uri:
        return ParentRun(connect(params), record["parent_run_id"])
    tags = {"psearch.data_version": "unknown"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["psearch.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    parent = ParentRun.create(params, "dvc", start_ms=record["started_ms"], tags=tags)
    record["parent_run_id"], record["tracking_uri"] = parent.run_id, uri
    _close_stale_parents(parent.client, record, uri)
    return parent


def pipeline_parent_run(params: Params) -> str | None:
    """The parent run id of the current `dvc repro` execution (created on first use), or None."""
    path, record = _open_record()
    if record is None:
        return None
    parent = _ensure_parent(record, params)
    _write_record(path, record)
    return parent.run_id


def note_stage_run(stage: str, run_id: str) -> None:
    """Record that `stage` opened MLflow run `run_id` (it then needs no run at the end)."""
    path, record = _open_record()
    name = os.environ.get("DVC_STAGE", stage)
    if record is None or name not in record["stages"]:
        return
    record["stages"][name]["run_id"] = run_id
    _write_record(path, record)


def finish_pipeline(params: Params) -> str | None:
    """Close the current `dvc repro` execution (see above); returns the parent run id or None."""
    path, record = _open_record()
    if record is None:
        return None
    stage = os.environ["DVC_STAGE"]
    record["stages"].setdefault(stage, {"start_ms": record["started_ms"]})["end_ms"] = _now_ms()
    parent_id = None
    if params.tracking.enabled:
        parent = _ensure_parent(record, params)
        for name, info in record["stages"].items():
            if info.get("run_id") or info.get("end_ms") is None:
                continue
            info["run_id"] = parent.attach_stage(name, info["start_ms"], info["end_ms"], params)
        parent.finish("FINISHED", end_ms=_now_ms())
        parent_id = parent.run_id
    _write_record(path.with_name(LAST_PIPELINE_RECORD), record)
    path.unlink(missing_ok=True)
    return parent_id


def stage_seconds(record: dict[str, Any]) -> dict[str, float]:
    """{stage: wall seconds} of an execution record, in the order the stages ran."""
    return {
        name: (info["end_ms"] - info["start_ms"]) / 1000.0
        for name, info in record.get("stages", {}).items()
        if info.get("end_ms") is not None
    }
