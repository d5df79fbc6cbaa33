"""Training on several nodes: the pipeline's train step as a Kubeflow Trainer v2 TrainJob.

The launcher task (components/train_nodes.py) runs this in its pod. It stages the task's
inputs (manifests, IDNet, params) on the checkpoint PVC, creates a TrainJob
(trainer.kubeflow.org/v1alpha1) whose nodes run `torchrun -m psearch train` on them and write
the model beside them, reports the job's status (conditions, child jobs) and node 0's log
until it ends, fails the task with the TrainJob's own failure message, and copies the model
into the task's output artifact, from where the next tasks take it as from the one-pod train.

The compile-time part of the TrainJob (runtime, image, nodes, resources, volumes, env from
the Secret) comes from the DAG as a JSON template (pipelines/trainjob.py); the run-time part
(name, command, the pipeline's MLflow parent run) is filled in here.

The job is named after the KFP run, so a retried launcher (its pod lost) finds the job its
predecessor started and follows it; a job that had failed is deleted and started again, and
its nodes resume from the checkpoints beside the model on the PVC (`psearch train --resume`).

Why the `kubernetes` client's CustomObjectsApi and not the kubeflow SDK's TrainerClient
(`kubeflow` 0.5 on PyPI): the SDK names every job at random (a retried launcher could not find
its predecessor's job), sets env from a Secret only through raw runtime patches, and its wait
raises "TrainJob X is Failed" without the job's message; it would also bring kubeflow,
kubeflow-trainer-api and kubeflow-katib-api into the images, for a few REST calls that
`kubernetes` (already a pinned dependency) makes directly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from components.runtime import drop_checkpoints, stage_params
from psearch.errors import PsearchError
from psearch.tracking import PARENT_RUN_ENV

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
# The replicated job and its container in the torch-distributed runtime the Trainer ships.
NODE = "node"
# The owner of this project's entry in spec.runtimePatches (one entry per manager).
PATCH_MANAGER = "psearch.kubeflow.org/pipeline"
# Labels JobSet puts on the pods of a TrainJob (its JobSet has the TrainJob's name).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# Where a pod finds its own namespace.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The server closes a watch after this long; the launcher reads the job again and watches on.
WATCH_SECONDS = 300
# How long the launcher waits for the rest of node 0's log once the job has ended.
LOG_DRAIN_SECONDS = 60
# How often the log follower looks for node 0's pod before it has started.
POD_POLL_SECONDS = 10.0

# What the run's service account must be allowed (docs/kubeflow.md shows them as a Role):
# the TrainJob itself, and (for node 0's log; without them the log is only not shown)
# the pods and their logs.
RBAC_RULES: tuple[dict[str, list[str]], ...] = (
    {
        "apiGroups": [GROUP],
        "resources": [PLURAL],
        "verbs": ["create", "get", "list", "watch", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
)

# A create refused for the cluster's set-up, and what to do about it.
CREATE_REFUSED = {
    403: "the run's service account may not create TrainJobs: apply the Role and RoleBinding "
    'of docs/kubeflow.md "Training on several nodes"',
    404: f"the cluster has no {PLURAL}.{GROUP}/{VERSION}: install Kubeflow Trainer v2",
}

Report = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


class TrainJobFailed(PsearchError):
    """The TrainJob ended Failed (or vanished); the message is the job's own."""


@dataclass(frozen=True)
class NodePaths:
    """What the nodes read and write, under the staging directory on the checkpoint PVC."""

    root: Path
    params: Path
    manifests: Path
    init: Path
    # Checkpoints go beside it (model.ckpt/), so a job started again resumes from them.
    model: Path

    @classmethod
    def under(cls, root: Path) -> NodePaths:
        return cls(root, root / "params.json", root / "manifests", root / "idnet", root / "model")


def trainjob_name(kfp_run_id: str) -> str:
    """The TrainJob of this KFP run: the same for every retry of the launcher, a valid
    RFC 1035 label (the CRD's rule on metadata.name) whatever the run id looks like."""
    if not kfp_run_id:
        raise PsearchError("train_nodes: no KFP run id to name the TrainJob after")
    return "psearch-train-" + hashlib.sha256(kfp_run_id.encode()).hexdigest()[:12]


def staging_paths(checkpoint_root: str, kfp_run_id: str) -> NodePaths:
    """ROOT/<KFP run id>/train-nodes on the checkpoint PVC, which the nodes mount too."""
    if not checkpoint_root:
        raise PsearchError(
            "train_nodes: the nodes share inputs and model through the checkpoint PVC, and "
            "there is none (pipeline.checkpoint_pvc)"
        )
    return NodePaths.under(Path(checkpoint_root) / kfp_run_id / "train-nodes")


def stage_inputs(paths: NodePaths, manifests: Path, params_json: str, init: Path | None) -> None:
    """Copy the task's inputs where the nodes read them (again on a retry: the same bytes)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(manifests, paths.manifests, dirs_exist_ok=True)
    if init is not None:
        shutil.copytree(init, paths.init, dirs_exist_ok=True)
    tmp = paths.params.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json.loads(params_json), indent=1, sort_keys=True))
    tmp.replace(paths.params)


def node_command(paths: NodePaths, with_init: bool) -> list[str]:
    """What every node runs. torchrun takes nodes, ranks and the rendezvous from the PET_*
    variables the torch-distributed runtime sets; --resume continues from model.ckpt/."""
    command = ["torchrun", "-m", "psearch", "train", "--params", str(paths.params)]
    command += ["--manifests", str(paths.manifests), "--out", str(paths.model), "--resume"]
    if with_init:
        command += ["--init", str(paths.init)]
    return command


def complete_trainjob(
    template: dict[str, Any],
    name: str,
    namespace: str,
    command: list[str],
    env: dict[str, str],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob to create: the DAG's template plus this run's name, command and env."""
    job = copy.deepcopy(template)
    metadata = job.setdefault("metadata", {})
    metadata.update(name=name, namespace=namespace)
    if annotations:
        metadata.setdefault("annotations", {}).update(annotations)
    trainer = job["spec"].setdefault("trainer", {})
    trainer["command"] = list(command)
    trainer.setdefault("env", []).extend({"name": k, "value": v} for k, v in env.items())
    return job


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The job's condition of type `kind` when it is True."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def outcome(job: dict[str, Any]) -> str | None:
    """Complete or Failed once the job has ended, else None."""
    if condition(job, "Failed"):
        return "Failed"
    if condition(job, "Complete"):
        return "Complete"
    return None


def failure_message(job: dict[str, Any]) -> str:
    name = job.get("metadata", {}).get("name", "?")
    cond = condition(job, "Failed") or {}
    reason = cond.get("reason") or "Failed"
    message = cond.get("message") or "no message"
    return f"TrainJob {name} failed ({reason}): {message}"


class StatusReport:
    """Reports what changed in a TrainJob's status: each new condition, the child jobs' counts."""

    def __init__(self, name: str, report: Report = _print):
        self.prefix = f"trainjob {name}:"
        self.report = report
        self.seen: set[tuple[str, ...]] = set()
        self.jobs: list[tuple[str, ...]] | None = None

    def update(self, job: dict[str, Any]) -> None:
        status = job.get("status") or {}
        for cond in status.get("conditions") or []:
            key = tuple(str(cond.get(k, "")) for k in ("type", "status", "reason", "message"))
            if key not in self.seen:
                self.seen.add(key)
                kind, state, reason, message = key
                self.report(f"{self.prefix} {kind}={state} ({reason}) {message}".rstrip())
        jobs = [
            (
                str(j.get("name")),
                *(str(j.get(k, 0)) for k in ("active", "ready", "succeeded", "failed")),
            )
            for j in status.get("jobsStatus") or []
        ]
        if jobs and jobs != self.jobs:
            self.jobs = jobs
            for name, active, ready, succeeded, failed in jobs:
                self.report(
                    f"{self.prefix} jobs {name}: active {active}, ready {ready}, "
                    f"succeeded {succeeded}, failed {failed}"
                )


class TrainJobs:
    """The TrainJob calls the launcher makes, in one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str, report: Report = _print):
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.report = report

    def _args(self) -> tuple[str, str, str, str]:
        return GROUP, VERSION, self.namespace, PLURAL

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(*self._args(), name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                *self._args(), name, propagation_policy="Foreground"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create the TrainJob, or take over the one a previous try of the task created: one
        still running or complete is followed, a failed one is deleted and created again."""
        name = body["metadata"]["name"]
        try:
            created = self.custom.create_namespaced_custom_object(*self._args(), body)
            self.report(f"trainjob {name}: created in namespace {self.namespace}")
            return created
        except ApiException as exc:
            if exc.status in CREATE_REFUSED:
                raise PsearchError(
                    f"cannot create TrainJob {name} in {self.namespace} ({exc.status} "
                    f"{exc.reason}): {CREATE_REFUSED[exc.status]}"
                ) from None
            if exc.status != 409:
                raise
        existing = self.get(name)
        if existing is not None and outcome(existing) != "Failed":
            self.report(f"trainjob {name}: exists (a previous try created it), following it")
            return existing
        if existing is not None:
            self.report(f"trainjob {name}: {failure_message(existing)}; deleting it to start again")
            self.delete(name)
            self._wait_gone(name)
        created = self.custom.create_namespaced_custom_object(*self._args(), body)
        self.report(f"trainjob {name}: created again, its nodes resume from the checkpoints")
        return created

    def _events(self, name: str, resource_version: str | None = None):
        """The job's watch events (from `resource_version`) until the server closes the watch."""
        return watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            *self._args(),
            field_selector=f"metadata.name={name}",
            timeout_seconds=WATCH_SECONDS,
            **({"resource_version": resource_version} if resource_version else {}),
        )

    def _wait_gone(self, name: str) -> None:
        """Foreground deletion takes the pods first; the name is free once the job is gone."""
        while self.get(name) is not None:
            if any(event["type"] == "DELETED" for event in self._events(name)):
                return

    def wait(self, name: str) -> dict[str, Any]:
        """Follow the job until it ends; return it Complete, raise TrainJobFailed otherwise.
        A watch the server closed (timeout, or 410 Gone: too old a resourceVersion) is started
        again from a fresh read of the job."""
        status = StatusReport(name, self.report)

        def ended(job: dict[str, Any] | None) -> bool:
            if job is None:
                raise TrainJobFailed(f"TrainJob {name} was deleted before it ended")
            status.update(job)
            if outcome(job) == "Failed":
                raise TrainJobFailed(failure_message(job))
            return outcome(job) == "Complete"

        while True:
            job = self.get(name)
            if ended(job):
                return job
            try:
                for event in self._events(name, job["metadata"].get("resourceVersion")):
                    job = None if event["type"] == "DELETED" else event["object"]
                    if ended(job):
                        return job
            except ApiException as exc:
                if exc.status != 410:
                    raise

    def follow_node_log(self, name: str, stop: threading.Event) -> None:
        """Print node 0's log (rank 0 reports the losses) line by line as it comes; each new
        pod of node 0 (a restarted node) in turn. Once `stop` is set (the job has ended) one
        last look prints a pod whose log was never read. The log is a convenience: an error
        (no pods/log permission, say) is reported once and the job is followed without it."""
        followed: set[str] = set()
        try:
            while True:
                ending = stop.is_set()
                for pod in self._node_zero_pods(name, followed):
                    followed.add(pod.metadata.uid)
                    self._print_log(pod.metadata.name)
                if ending:
                    return
                stop.wait(POD_POLL_SECONDS)
        except Exception as exc:  # noqa: BLE001 - the log is optional, the job's status is not
            self.report(f"trainjob {name}: node 0's log is not available ({exc})".splitlines()[0])

    def _node_zero_pods(self, name: str, followed: set[str]) -> list[Any]:
        """Node 0's pods that have started and whose log was not printed yet."""
        selector = f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={NODE},{JOB_INDEX_LABEL}=0"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return [
            pod
            for pod in pods
            if pod.status
            and pod.status.phase in ("Running", "Succeeded", "Failed")
            and pod.metadata.uid not in followed
        ]

    def _print_log(self, pod: str) -> None:
        log = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=NODE, follow=True, _preload_content=False
        )
        try:
            for line in log:
                self.report(f"[{pod}] {line.decode(errors='replace').rstrip()}")
        finally:
            log.release_conn()


def api_client() -> client.ApiClient:
    """In a pod: its service account; elsewhere: the kubeconfig."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def own_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        raise PsearchError(
            f"train_nodes: cannot tell the namespace ({SERVICE_ACCOUNT_NAMESPACE} is missing: "
            "not in a pod)"
        ) from None


def run_trainjob(
    template_json: str,
    manifests: Path,
    params_json: str,
    pipeline_run_id: str,
    checkpoint_root: str,
    kfp_run_id: str,
    model_out: Path,
    init: Path | None = None,
    *,
    api: client.ApiClient | None = None,
    namespace: str | None = None,
    report: Report = _print,
) -> dict[str, Any]:
    """The launcher task: stage, create (or take over), follow, collect; return the job."""
    stage_params(params_json, pipeline_run_id)  # a bad params_json fails here, not on the nodes
    try:
        template = json.loads(template_json)
    except ValueError as exc:
        raise PsearchError(f"train_nodes: the TrainJob template is not JSON ({exc})") from None
    paths = staging_paths(checkpoint_root, kfp_run_id)
    stage_inputs(paths, manifests, params_json, init)
    name = trainjob_name(kfp_run_id)
    namespace = namespace or own_namespace()
    env = {PARENT_RUN_ENV: pipeline_run_id} if pipeline_run_id else {}
    body = complete_trainjob(
        template,
        name,
        namespace,
        node_command(paths, init is not None),
        env,
        annotations={"psearch/kfp-run-id": kfp_run_id},
    )
    jobs = TrainJobs(api or api_client(), namespace, report)
    jobs.submit(body)
    stop = threading.Event()
    logs = threading.Thread(target=jobs.follow_node_log, args=(name, stop), daemon=True)
    logs.start()
    try:
        job = jobs.wait(name)
    finally:
        stop.set()
        logs.join(timeout=LOG_DRAIN_SECONDS)
    # The failed job is kept for `kubectl describe`; a retry of the task deletes it.
    if not (paths.model / "model.pt").is_file():
        raise PsearchError(f"TrainJob {name} completed without writing {paths.model}/model.pt")
    shutil.copytree(paths.model, model_out, dirs_exist_ok=True)
    jobs.delete(name)
    report(f"trainjob {name}: model copied to the task's output; job deleted")
    drop_checkpoints(paths.root)
    return job
