"""The multi-node train step's calls to the Kubernetes API, against a replaying fake server.

There is no cluster here (no Kubernetes, no Kubeflow Trainer): the launcher
(components.trainjob.run_trainjob, what the `train-nodes` task runs) talks to
tests/trainjob_fixtures.FakeKubernetes on 127.0.0.1, which answers from the scenarios in
tests/trainjob/*.json. Those responses were written by hand in the form the API server gives
them (Status objects for 404/409/410, watch events one a line, a PodList, a plain-text log),
with TrainJob statuses that pass the CRD's own status schema (checked below) and JobSet's
condition reasons; they were not captured from a live cluster. The fake stands in for the
nodes too: when the job is watched it writes model.pt where the nodes would.

Covered: create -> watch -> Complete -> model copied, job deleted (success); a Failed job
fails the task with the job's reason and message and is kept (failure); a watch closed by
the server and one answered 410 Gone are started again from a fresh read (stream); a retried
task deletes the previous try's failed job and creates it again (retry). Every request is
checked against the RBAC rules docs/kubeflow.md asks for, and the TrainJob that reached the
server against the CRD's schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubernetes import client
from trainjob_fixtures import FakeKubernetes, load_scenario, schema_errors

from components import trainjob
from components.runtime import params_json
from components.train_nodes import train_nodes
from pipelines.settings import settings_for
from pipelines.trainjob import trainjob_template
from psearch.config import load_params
from psearch.tracking import PARENT_RUN_ENV

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "team-a"
KFP_RUN = "5f0c4c3e-8d1b-4e2a-9f3c-7a6b5c4d3e2f"
NAME = trainjob.trainjob_name(KFP_RUN)
MLFLOW_PARENT = "0123456789abcdef0123456789abcdef"


def _scenario(name: str) -> dict:
    return load_scenario(name, name=NAME, ns=NAMESPACE)["routes"]


def _api(fake: FakeKubernetes) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = fake.url
    return client.ApiClient(cfg)


@pytest.fixture()
def task(tmp_path, monkeypatch):
    """The launcher's inputs as KFP hands them over, and the checkpoint PVC's mount."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    params = load_params(REPO / "params.yaml", ["pipeline.train_nodes=2", "tracking.enabled=false"])
    manifests = tmp_path / "artifacts" / "manifests"
    manifests.mkdir(parents=True)
    (manifests / "train.parquet").write_bytes(b"rows")
    idnet = tmp_path / "artifacts" / "idnet"
    idnet.mkdir()
    (idnet / "idnet.pt").write_bytes(b"idnet weights")
    pvc = tmp_path / "pvc"
    pvc.mkdir()
    return {
        "template": json.dumps(trainjob_template(settings_for(params))),
        "params_json": params_json(params),
        "manifests": manifests,
        "idnet": idnet,
        "pvc": pvc,
        "out": tmp_path / "artifacts" / "model",
        "paths": trainjob.staging_paths(str(pvc), KFP_RUN),
    }


def _nodes_write_the_model(paths: trainjob.NodePaths):
    """What the TrainJob's nodes leave on the PVC: rank 0's model.pt and run.json."""

    def write() -> None:
        paths.model.mkdir(parents=True, exist_ok=True)
        (paths.model / "model.pt").write_bytes(b"trained weights")
        (paths.model / "run.json").write_text('{"run_id": "r1"}')

    return write


def _launch(task: dict, fake: FakeKubernetes, lines: list[str]):
    return trainjob.run_trainjob(
        task["template"],
        task["manifests"],
        task["params_json"],
        MLFLOW_PARENT,
        str(task["pvc"]),
        KFP_RUN,
        task["out"],
        init=task["idnet"],
        api=_api(fake),
        namespace=NAMESPACE,
        report=lines.append,
    )


def _complete_run(task: dict, routes: dict) -> tuple[FakeKubernetes, list[str]]:
    """Launch against `routes` while the "nodes" write the model; the job must complete."""
    lines: list[str] = []
    hooks = {f"WATCH {_jobs_path()}": _nodes_write_the_model(task["paths"])}
    with FakeKubernetes(routes, hooks) as fake:
        job = _launch(task, fake, lines)
    assert fake.unexpected == []
    assert trainjob.outcome(job) == "Complete"
    assert (task["out"] / "model.pt").read_bytes() == b"trained weights"
    _check_rbac(fake)
    return fake, lines


def _allowed(request: dict) -> tuple[str, str, str]:
    """(API group, resource, verb) of a recorded request, as RBAC names them."""
    method, path = request["route"].split(" ", 1)
    parts = path.strip("/").split("/")
    if parts[0] == "api":  # core group: api/v1/namespaces/NS/pods[/NAME[/log]]
        group, rest = "", parts[4:]
    else:  # apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME]
        group, rest = parts[1], parts[5:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {
        "POST": "create",
        "DELETE": "delete",
        "WATCH": "watch",
        "GET": "get" if named else "list",
    }[method]
    return group, resource, verb


def _check_rbac(fake: FakeKubernetes) -> None:
    granted = {
        (group, resource, verb)
        for rule in trainjob.RBAC_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for request in fake.requests:
        assert _allowed(request) in granted, request["route"]


@pytest.mark.parametrize("scenario", ["success", "failure", "stream", "retry"])
def test_recorded_statuses_follow_the_crd(scenario):
    """The replayed TrainJobs are what the CRD allows (status included), so the launcher is
    tested on objects a real server could send."""
    routes = _scenario(scenario)
    objects = [r["body"] for r in routes.get(f"GET {_job_path()}", []) if r["status"] == 200]
    for watch in routes[f"WATCH {_jobs_path()}"]:
        objects += [e["object"] for e in watch["events"] if e["type"] != "ERROR"]
    assert objects
    for obj in objects:
        assert schema_errors(obj) == [], obj["metadata"]["resourceVersion"]


def _jobs_path() -> str:
    return f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"


def _job_path() -> str:
    return f"{_jobs_path()}/{NAME}"


def test_success_creates_follows_collects_and_deletes(task):
    fake, lines = _complete_run(task, _scenario("success"))

    # The TrainJob that reached the server: valid against the CRD, with this run's command.
    (create,) = fake.calls(f"POST {_jobs_path()}")
    body = create["body"]
    assert schema_errors(body) == []
    assert body["metadata"]["name"] == NAME
    assert body["metadata"]["annotations"]["psearch/kfp-run-id"] == KFP_RUN
    trainer = body["spec"]["trainer"]
    root = task["paths"].root
    assert trainer["command"] == [
        "torchrun",
        *("-m", "psearch", "train", "--params", str(root / "params.json")),
        *("--manifests", str(root / "manifests"), "--out", str(root / "model"), "--resume"),
        *("--init", str(root / "idnet")),
    ]
    assert {"name": PARENT_RUN_ENV, "value": MLFLOW_PARENT} in trainer["env"]
    assert trainer["numNodes"] == 2

    # Read, watched from the version read, by name; then deleted, pods first.
    (watch,) = fake.calls(f"WATCH {_jobs_path()}")
    assert watch["query"]["fieldSelector"] == f"metadata.name={NAME}"
    assert watch["query"]["resourceVersion"] == "1002"
    assert int(watch["query"]["timeoutSeconds"]) == trainjob.WATCH_SECONDS
    (delete,) = fake.calls(f"DELETE {_job_path()}")
    assert delete["query"]["propagationPolicy"] == "Foreground"

    # The model is the task's output; the staging directory on the PVC is gone.
    assert (task["out"] / "run.json").is_file()
    assert not root.exists()

    # The status stream and node 0's log, as the task's log shows them.
    prefix = f"trainjob {NAME}:"
    assert f"{prefix} created in namespace {NAMESPACE}" in lines
    assert f"{prefix} jobs node: active 1, ready 0, succeeded 0, failed 0" in lines
    assert f"{prefix} jobs node: active 1, ready 1, succeeded 0, failed 0" in lines
    assert f"{prefix} Complete=True (JobsCompleted) jobset completed successfully" in lines
    assert f"[{NAME}-node-0-0-7xq2k] step 2/2 loss 4.6001" in lines
    assert lines.count(f"[{NAME}-node-0-0-7xq2k] step 2/2 loss 4.6001") == 1  # read once
    selector = (
        f"jobset.sigs.k8s.io/jobset-name={NAME},jobset.sigs.k8s.io/replicatedjob-name=node,"
        "batch.kubernetes.io/job-completion-index=0"
    )
    pods = fake.calls(f"GET /api/v1/namespaces/{NAMESPACE}/pods")
    assert pods and all(p["query"]["labelSelector"] == selector for p in pods)


def test_a_failed_trainjob_fails_the_task_with_its_message(task):
    lines: list[str] = []
    fake = FakeKubernetes(_scenario("failure"))
    with fake, pytest.raises(trainjob.TrainJobFailed) as failed:
        _launch(task, fake, lines)
    assert fake.unexpected == []
    assert str(failed.value) == (
        f"TrainJob {NAME} failed (FailedJobs): jobset failed due to one or more job failures"
    )
    # Kept for `kubectl describe`; nothing reaches the task's output.
    assert fake.calls(f"DELETE {_job_path()}") == []
    assert not task["out"].exists()
    # Node 0's traceback is in the task's log, beside the status.
    assert any("CUDA out of memory" in line for line in lines)
    assert any("Failed=True (FailedJobs)" in line for line in lines)
    _check_rbac(fake)


def test_the_status_stream_survives_closed_and_expired_watches(task):
    fake, lines = _complete_run(task, _scenario("stream"))
    watches = fake.calls(f"WATCH {_jobs_path()}")
    # Each watch starts from the version just read: after the close, after the 410.
    assert [w["query"]["resourceVersion"] for w in watches] == ["1002", "1400", "1600"]
    assert len(fake.calls(f"GET {_job_path()}")) == 3
    # The child jobs' counts are reported once per change, not once per event.
    ready = f"trainjob {NAME}: jobs node: active 1, ready 1, succeeded 0, failed 0"
    assert lines.count(ready) == 1


def test_a_retried_task_replaces_the_failed_job_of_the_previous_try(task):
    fake, lines = _complete_run(task, _scenario("retry"))
    routes = [r["route"].split(" ")[0] for r in fake.requests if "/trainjobs" in r["route"]]
    assert routes == ["POST", "GET", "DELETE", "GET", "WATCH", "POST", "GET", "WATCH", "DELETE"]
    assert any("deleting it to start again" in line for line in lines)


def test_a_running_job_of_a_previous_try_is_followed_not_replaced(task):
    """The launcher's pod was lost while the job ran: the retry follows the same job."""
    routes = _scenario("success")
    running = _scenario("stream")[f"GET {_job_path()}"][1]
    routes[f"POST {_jobs_path()}"] = _scenario("retry")[f"POST {_jobs_path()}"][:1]
    routes[f"GET {_job_path()}"] = [running]
    fake, lines = _complete_run(task, routes)
    assert len(fake.calls(f"POST {_jobs_path()}")) == 1
    assert any("a previous try created it" in line for line in lines)


def test_the_inputs_are_staged_on_the_pvc_before_the_job_is_created(task):
    seen = {}

    def look() -> None:
        paths = task["paths"]
        seen["files"] = sorted(p.relative_to(paths.root).as_posix() for p in paths.root.rglob("*"))
        seen["params"] = json.loads(paths.params.read_text())

    fake = FakeKubernetes(_scenario("failure"), {f"POST {_jobs_path()}": look})
    with fake, pytest.raises(trainjob.TrainJobFailed):
        _launch(task, fake, [])
    assert seen["files"] == [
        "idnet",
        "idnet/idnet.pt",
        "manifests",
        "manifests/train.parquet",
        "params.json",
    ]
    assert seen["params"] == json.loads(task["params_json"])


def test_bad_inputs_fail_before_anything_is_created(task):
    with FakeKubernetes({}) as fake:
        with pytest.raises(trainjob.PsearchError, match="params_json: not valid JSON"):
            trainjob.run_trainjob(
                task["template"], task["manifests"], "{", "", str(task["pvc"]), KFP_RUN,
                task["out"], api=_api(fake), namespace=NAMESPACE,
            )  # fmt: skip
        with pytest.raises(trainjob.PsearchError, match="no checkpoint PVC|checkpoint PVC"):
            trainjob.run_trainjob(
                task["template"], task["manifests"], task["params_json"], "", "", KFP_RUN,
                task["out"], api=_api(fake), namespace=NAMESPACE,
            )  # fmt: skip
    assert fake.requests == []


def test_the_component_body_hands_its_artifacts_to_the_launcher(monkeypatch, tmp_path):
    """components.train_nodes (what the compiled task runs) passes KFP's artifact paths on."""
    calls = []
    monkeypatch.setattr(trainjob, "run_trainjob", lambda *a, **kw: calls.append((a, kw)))
    artifact = {name: SimpleNamespace(path=str(tmp_path / name)) for name in ("m", "i", "o")}
    train_nodes(
        artifact["m"], "{}", "parent", "/mnt/c", "run-1", "{}", artifact["o"], artifact["i"]
    )
    train_nodes(artifact["m"], "{}", "parent", "/mnt/c", "run-1", "{}", artifact["o"])
    (args, kwargs), (_, no_init) = calls
    assert args == ("{}", tmp_path / "m", "{}", "parent", "/mnt/c", "run-1", tmp_path / "o")
    assert kwargs == {"init": tmp_path / "i"} and no_init == {"init": None}


@pytest.mark.parametrize(
    ("status", "reason", "hint"),
    [(403, "Forbidden", "apply the Role and RoleBinding"), (404, "NotFound", "install Kubeflow")],
)
def test_a_refused_create_says_what_the_cluster_lacks(task, status, reason, hint):
    refused = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status}
    refused["reason"] = reason
    fake = FakeKubernetes({f"POST {_jobs_path()}": [{"status": status, "body": refused}]})
    with fake, pytest.raises(trainjob.PsearchError) as exc:
        _launch(task, fake, [])
    assert str(exc.value).startswith(f"cannot create TrainJob {NAME} in {NAMESPACE} ({status} ")
    assert hint in str(exc.value) and "\n" not in str(exc.value)
