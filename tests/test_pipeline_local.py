"""`psearch pipeline run-local`: the very DAG that is compiled for the cluster, run here.

kfp.local.SubprocessRunner(use_venv=False) executes every component in a
subprocess of this environment; the kfp-kubernetes settings (PVC, Secret, node
selector, tolerations) and the resource / accelerator requests are part of the
same pipeline and kfp.local ignores them without error, which this run shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_quick import assert_index_and_metrics, quick_overrides

from components.runtime import (
    beats_champion,
    close_pipeline_runs,
    decision_metric,
    open_pipeline_run,
    shard_parts,
    stage_params,
)
from pipelines.compile import compile_pipeline, pipeline_function
from pipelines.local import local_settings, run_local
from psearch.config import load_params
from psearch.errors import PsearchError
from psearch.registry import decide

REPO = Path(__file__).resolve().parents[1]
QUICK = quick_overrides("pipeline-local-test")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run-local")
    params = load_params(REPO / "params.yaml", QUICK)
    return params, run_local(params, workdir), workdir


@pytest.mark.slow
def test_run_local_runs_every_stage_and_writes_metrics(local_run):
    params, result, workdir = local_run
    run_dir = Path(result["run_dir"])
    # Every task ran, the extraction fanned out, promotion ran (no champion before).
    for task in ("dataset-digest", "ingest", "tracking", "pretrain", "train", "extract-merge",
                 "evaluate", "index", "register", "promote", "close-runs"):  # fmt: skip
        assert (run_dir / task / "executor_output.json").is_file(), task
    # The dataset's digest reached ingest, whose cache key it is.
    digest = json.loads((run_dir / "dataset-digest" / "executor_output.json").read_text())
    assert digest["parameterValues"]["Output"].startswith("sha256:")
    assert len(list(run_dir.glob("for-loop-*-iteration-*/extract"))) == 2
    # The gallery index `psearch serve` loads was built from the merged extraction.
    metrics = assert_index_and_metrics(run_dir, result)
    # evaluate logged the flattened metrics to its Output[Metrics] and returned the decision value.
    evaluate = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    logged = evaluate["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["search.gallery_100.mAP"] == metrics["search"]["gallery_100"]["mAP"]
    assert evaluate["parameterValues"]["Output"] == metrics["search"]["gallery_100"]["mAP"]
    register = json.loads((run_dir / "register" / "executor_output.json").read_text())
    assert register["parameterValues"]["Output"] == "1"
    assert result["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"


@pytest.mark.slow
def test_run_local_tracks_one_pipeline_run_with_stage_children(local_run):
    import mlflow

    params, result, _ = local_run
    client = mlflow.MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name("pipeline-local-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("psearch.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "2"
    children = {
        r.data.tags["psearch.stage"]
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert {"pretrain", "train", "register"} <= children
    champion = client.get_model_version_by_alias(params.register.model_name, "champion")
    assert str(champion.version) == "1"


@pytest.mark.slow
def test_a_failed_pipeline_leaves_no_mlflow_run_running(tmp_path):
    """The exit handler ends the parent run (and the failed stage's) as FAILED."""
    import mlflow

    # Fails at the start of pretrain, after tracking and ingest have run.
    bad = [*QUICK, "pretrain.crop_context=0.5", "tracking.experiment=pipeline-local-failure"]
    with pytest.raises(PsearchError, match="run-local"):
        run_local(load_params(REPO / "params.yaml", bad), tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pipeline-local-failure")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("psearch.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.slow
def test_champion_decision_is_promotes_rule(local_run):
    """The pipeline's dsl.If decision reads the registry exactly as `psearch promote` does."""
    params, result, _ = local_run
    params = load_params(
        REPO / "params.yaml", [*QUICK, f"tracking.tracking_uri={result['tracking_uri']}"]
    )
    assert beats_champion(params, "1") == (False, "version 1 already is the champion")
    promoted, reason = beats_champion(params, "7")
    assert promoted is False and "no version 7" in reason


@pytest.mark.parametrize(
    "candidate_value, champion, champion_value, force, expected",
    [
        (0.5, None, None, False, True),  # first model
        (0.6, "1", 0.5, False, True),  # better
        (0.5, "1", 0.5, False, False),  # equal is not better
        (0.4, "1", 0.5, False, False),  # worse
        (0.4, "1", 0.5, True, True),  # forced
        (None, "1", 0.5, False, False),  # candidate lacks the metric
    ],
)
def test_decide_is_strictly_greater(candidate_value, champion, champion_value, force, expected):
    promoted, reason = decide(
        "2", candidate_value, champion, champion_value, "search.gallery_100.mAP", "champion", force
    )
    assert promoted is expected, reason


def test_decide_refuses_a_champion_without_the_metric():
    with pytest.raises(PsearchError, match=r"has no metric tag .*\(use --force\)"):
        decide("2", 0.9, "1", None, "search.gallery_100.mAP", "champion")


def test_stage_params_and_helpers_name_what_is_wrong(tmp_path):
    params = stage_params(json.dumps({"train": {"lr": 0.5}}))
    assert params.train.lr == 0.5
    with pytest.raises(PsearchError, match="params_json: not valid JSON"):
        stage_params("{train")
    with pytest.raises(PsearchError, match="params_json: unknown parameter train.lrr"):
        stage_params('{"train": {"lrr": 1}}')
    flat = {"search.gallery_100.mAP": 0.5, "search.gallery_100.queries": 3.0}
    assert decision_metric(flat, "search.gallery_100.mAP") == 0.5
    with pytest.raises(PsearchError, match="register.metric: 'search.gallery_50.mAP' is not"):
        decision_metric(flat, "search.gallery_50.mAP")
    (tmp_path / "a" / "part-000-of-002").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    assert shard_parts([tmp_path / "a"]) == [tmp_path / "a" / "part-000-of-002"]
    with pytest.raises(PsearchError, match="expected one extraction part, found 0"):
        shard_parts([tmp_path / "a", tmp_path / "b"])


def test_a_task_refuses_params_that_would_send_the_secrets_credentials_elsewhere(monkeypatch):
    # In the cluster the Secret sets MLFLOW_TRACKING_URI (and the credentials for it).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.internal")
    other = json.dumps({"tracking": {"tracking_uri": "https://attacker.example"}})
    with pytest.raises(PsearchError, match="tracking.tracking_uri: 'https://attacker.example'"):
        stage_params(other)
    same = json.dumps({"tracking": {"tracking_uri": "https://mlflow.internal"}})
    assert stage_params(same).tracking.tracking_uri == "https://mlflow.internal"
    assert stage_params("{}").tracking.tracking_uri is None  # the Secret's server, by default
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert stage_params(other).tracking.tracking_uri == "https://attacker.example"  # no Secret


def test_run_local_builds_the_dag_without_task_retries(tmp_path, monkeypatch):
    """kfp.local waits out a retry's backoff (300 s, then 600 s for training): a failed local
    run would hang for 15 minutes before saying anything."""
    from kfp import compiler

    params = load_params(REPO / "params.yaml")
    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(pipeline_function(params, local_settings(params)), str(out))
    assert "retryPolicy" not in out.read_text()
    compile_pipeline(params, tmp_path / "cluster.yaml")  # the cluster's DAG keeps them
    assert (tmp_path / "cluster.yaml").read_text().count("retryPolicy") == 3


def test_run_local_refuses_a_file_as_workdir(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(PsearchError, match="is not a directory"):
        run_local(load_params(None, []), target)


# The exit handler's PipelineTaskFinalStatus says CANCELLED (kfp.dsl's spelling); the REST
# API's run state says CANCELED: a cancelled run is KILLED in MLflow either way.
@pytest.mark.parametrize("cancelled", ["CANCELLED", "CANCELED", "cancelled"])
def test_the_kfp_parent_run_is_opened_and_closed_by_its_run_id(tmp_path, monkeypatch, cancelled):
    """What the tracking and close-runs tasks do, without kfp.local: the parent run found by
    its kfp.run_id tag ends with the pipeline's state, with the stage runs it left RUNNING."""
    import mlflow

    monkeypatch.delenv("PSEARCH_PARENT_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = load_params(None, [f"tracking.tracking_uri={uri}", "tracking.experiment=kfp-close"])
    parent = open_pipeline_run(params, "kfp-1", "person-search-x")
    other = open_pipeline_run(params, "kfp-2", "person-search-y")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("kfp-close").experiment_id
    child_tags = {"mlflow.parentRunId": parent}
    killed = client.create_run(experiment, tags=child_tags).info.run_id
    done = client.create_run(experiment, tags=child_tags).info.run_id
    client.set_terminated(done, "FINISHED")
    tags = client.get_run(parent).data.tags
    assert (tags["psearch.runner"], tags["kfp.run_name"]) == ("kubeflow", "person-search-x")

    assert sorted(close_pipeline_runs(params, "kfp-1", cancelled)) == sorted([killed, parent])
    status = {run_id: client.get_run(run_id).info.status for run_id in (parent, killed, done)}
    assert status == {parent: "KILLED", killed: "KILLED", done: "FINISHED"}
    assert client.get_run(other).info.status == "RUNNING"  # another pipeline run's parent
    assert close_pipeline_runs(params, "kfp-1", "SUCCEEDED") == []  # nothing left RUNNING
    off = load_params(None, ["tracking.enabled=false"])
    assert (
        open_pipeline_run(off, "kfp-3", "x") == ""
        and close_pipeline_runs(off, "kfp-3", "FAILED") == []
    )
