"""One pipeline execution's MLflow parent run, whoever runs the pipeline.

A pipeline execution (`dvc repro`, a Kubeflow run) groups its stages' MLflow
runs under one parent run. Both runners use this one abstraction: create the
parent (tagged `psearch.stage: pipeline` and `psearch.runner`, with the params
and provenance, named `runner · label` — the label defaults to the start time), find it again by a tag, give a stage that opened no run of its
own a child run with its recorded times, learn the data version from the first
stage that reads data, and finish the execution: the parent and any stage run a
killed process left RUNNING end with the execution's status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psearch.config import Params
from psearch.tracking.mlflow_runs import connect, log_params, open_experiment, provenance_tags
from psearch.tracking.names import parent_run_name, stage_run_name

PIPELINE_STAGE = "pipeline"
DATA_VERSION_TAG = "psearch.data_version"


@dataclass
class ParentRun:
    """The MLflow run `run_id` that parents one execution's stage runs."""

    client: Any  # mlflow.MlflowClient
    run_id: str

    @classmethod
    def create(
        cls,
        params: Params,
        runner: str,
        *,
        label: str | None = None,
        start_ms: int | None = None,
        tags: dict[str, str] | None = None,
    ) -> ParentRun:
        """A new RUNNING parent run in the params' experiment, with the params logged, named
        `runner · label` (`label` defaults to the UTC start time)."""
        client, experiment_id = open_experiment(params)
        tags = {
            "psearch.stage": PIPELINE_STAGE,
            "psearch.runner": runner,
            **provenance_tags(),
            **(tags or {}),
        }
        name = parent_run_name(runner, label, start_ms)
        run = client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=name)
        log_params(client, run.info.run_id, params)
        return cls(client, run.info.run_id)

    @classmethod
    def find(cls, params: Params, tag: str, value: str) -> list[ParentRun]:
        """The parent runs in the params' experiment whose `tag` is `value`."""
        client = connect(params)
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        if experiment is None:
            return []
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{tag}` = '{value}'"
        )
        return [cls(client, run.info.run_id) for run in runs]

    def note_data_version(self, version: str) -> None:
        """The execution's data version, learned from a stage that read the manifests."""
        self.client.set_tag(self.run_id, DATA_VERSION_TAG, version)

    def attach_stage(self, stage: str, start_ms: int, end_ms: int, params: Params) -> str:
        """A finished child run for `stage`, which ran from `start_ms` to `end_ms` without
        an MLflow run of its own; returns its id."""
        parent = self.client.get_run(self.run_id)
        version = parent.data.tags.get(DATA_VERSION_TAG, "unknown")
        tags = {
            "psearch.stage": stage,
            "mlflow.parentRunId": self.run_id,
            DATA_VERSION_TAG: version,
            "psearch.git_revision": parent.data.tags.get("psearch.git_revision", "unknown"),
        }
        child = self.client.create_run(
            parent.info.experiment_id,
            start_time=start_ms,
            tags=tags,
            run_name=stage_run_name(stage, params, version),
        )
        log_params(self.client, child.info.run_id, params)
        self.client.set_terminated(child.info.run_id, "FINISHED", end_time=end_ms)
        return child.info.run_id

    def finish(self, status: str = "FINISHED", end_ms: int | None = None) -> list[str]:
        """End the parent and its stage runs that are still RUNNING with `status` (FINISHED,
        FAILED or KILLED); return the ids of the runs it ended."""
        parent = self.client.get_run(self.run_id)
        children = self.client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'",
        )
        ended = []
        for run in [*children, parent]:
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status=status, end_time=end_ms)
                ended.append(run.info.run_id)
        return ended
