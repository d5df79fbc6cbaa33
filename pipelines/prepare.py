"""`psearch pipeline prepare` (`python -m pipelines prepare`): make a namespace ready for the pipeline, or say what is missing.

With the official `kubernetes` client, before anything is submitted:
1. the namespace exists;
2. the Secret named by pipeline.secret holds the MLflow / S3 credentials set in
   the user's environment (created, or replaced when they changed: read first,
   so running it twice changes nothing);
3. the dataset PVC exists (created empty when missing: the dataset is copied
   into it once, see docs/kubeflow.md), and whether its volume is read-only
   (kfp-kubernetes cannot mount a PVC read-only, so the volume must be);
   the checkpoint PVC exists (created when missing);
4. nodes with the GPU label exist, have allocatable GPUs and no taint the GPU
   tasks do not tolerate.
Every finding is one plain line; problems make the command fail.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from pipelines.settings import PipelineSettings, Toleration, settings_for
from psearch.config import Params
from psearch.errors import PsearchError

MANAGED_BY = {"app.kubernetes.io/managed-by": "psearch"}
LOCAL_STORES = ("sqlite:", "file:", "./", "/")


@dataclass
class PrepareReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, message: str) -> None:
        self.lines.append(f"ok       {message}")

    def changed(self, verb: str, message: str) -> None:
        self.lines.append(f"{verb:<8} {message}")

    def warn(self, message: str) -> None:
        self.lines.append(f"warning  {message}")

    def problem(self, message: str) -> None:
        self.problems.append(message)
        self.lines.append(f"MISSING  {message}")


def core_api(kubeconfig: str | None = None, context: str | None = None):
    """A CoreV1Api for the kubeconfig (or the in-cluster service account)."""
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=kubeconfig, context=context)
    except (ConfigException, OSError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise PsearchError(f"{where}: cannot load the Kubernetes config ({exc})") from None
    return client.CoreV1Api()


def prepare(
    params: Params,
    namespace: str,
    kubeconfig: str | None = None,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    api: Any = None,
) -> PrepareReport:
    """Create or update what the pipeline needs in `namespace`; report what is missing."""
    settings = settings_for(params)
    environ = os.environ if environ is None else environ
    api = api or core_api(kubeconfig, context)
    report = PrepareReport()
    try:
        if not _namespace(api, namespace, report):
            return report
        _secret(api, namespace, settings, environ, report)
        _dataset_pvc(api, namespace, settings, report)
        if settings.checkpoint_pvc:
            _checkpoint_pvc(api, namespace, settings, report)
        _gpu_nodes(api, settings, report)
    except ApiException as exc:
        raise PsearchError(f"Kubernetes API: {exc.status} {exc.reason}".strip()) from None
    except HTTPError as exc:
        raise PsearchError(f"Kubernetes API is unreachable ({exc})") from None
    return report


def _namespace(api, namespace: str, report: PrepareReport) -> bool:
    try:
        api.read_namespace(namespace)
    except ApiException as exc:
        if exc.status == 404:
            report.problem(
                f"namespace {namespace} does not exist (create it, or a Kubeflow profile for it)"
            )
            return False
        if exc.status != 403:  # a namespaced user may not read namespaces: go on
            raise
    report.ok(f"namespace {namespace}")
    return True


def _secret(api, namespace, settings: PipelineSettings, environ, report: PrepareReport) -> None:
    values = {key: environ[key] for key in settings.secret_keys if environ.get(key)}
    for key in settings.secret_required:
        if key not in values:
            report.problem(f"{key} is not set in your environment; the tasks need it")
    uri = values.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(LOCAL_STORES):
        report.problem(
            f"MLFLOW_TRACKING_URI={uri} is a local store; the cluster's tasks need an MLflow "
            "server URL (http://... or https://...)"
        )
    if report.problems:
        return
    name = settings.secret
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY),
        type="Opaque",
        string_data=values,
    )
    keys = ", ".join(sorted(values))
    try:
        existing = api.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        api.create_namespaced_secret(namespace, body)
        report.changed("created", f"secret {name} with {keys}")
        return
    current = {k: base64.b64decode(v).decode() for k, v in (existing.data or {}).items()}
    if current == values:
        report.ok(f"secret {name} already holds {keys}")
        return
    api.replace_namespaced_secret(name, namespace, body)
    report.changed("updated", f"secret {name} now holds {keys}")


def _read_or_create_pvc(
    api, namespace: str, name: str, size: str, mode: str, storage_class: str | None
) -> Any:
    """The PVC `name`, or None after creating it (`size`, access `mode`)."""
    try:
        return api.read_namespaced_persistent_volume_claim(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
    spec = client.V1PersistentVolumeClaimSpec(
        access_modes=[mode],
        resources=client.V1VolumeResourceRequirements(requests={"storage": size}),
        storage_class_name=storage_class,
    )
    body = client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY), spec=spec
    )
    api.create_namespaced_persistent_volume_claim(namespace, body)
    return None


def _dataset_pvc(api, namespace: str, settings: PipelineSettings, report: PrepareReport) -> None:
    name, mode = settings.dataset_pvc, settings.dataset_pvc_access_mode
    size, storage_class = settings.dataset_pvc_size, settings.dataset_storage_class
    pvc = _read_or_create_pvc(api, namespace, name, size, mode, storage_class)
    if pvc is None:
        report.changed(
            "created",
            f"pvc {name} ({size}, {mode}); it is empty: copy the raw dataset into it, then make "
            "its volume read-only (docs/kubeflow.md, step 5)",
        )
        return
    phase = pvc.status.phase if pvc.status else None
    modes = list(pvc.spec.access_modes or []) if pvc.spec else []
    report.ok(f"pvc {name} exists ({phase or 'unknown phase'}, {', '.join(modes) or 'no modes'})")
    if modes == ["ReadWriteOnce"] and settings.extract_shards > 1:
        report.warn(
            f"pvc {name} is ReadWriteOnce: extraction shards on different nodes cannot all "
            "mount it; use ReadWriteMany/ReadOnlyMany storage or pipeline.extract_shards: 1"
        )
    _read_only_volume(api, pvc, report)


def _read_only_volume(api, pvc, report: PrepareReport) -> None:
    """Say whether the dataset's volume is read-only. KFP's mount_pvc has no read-only flag
    (kfp-kubernetes 2.17's PvcMount: name, mount path, sub-path), so the tasks see the dataset
    writable unless its PersistentVolume's source is `readOnly: true`."""
    name = pvc.metadata.name
    volume = pvc.spec.volume_name if pvc.spec else None
    if not volume:
        report.warn(f"pvc {name} is not bound yet: cannot tell whether its volume is read-only")
        return
    try:
        pv = api.read_persistent_volume(volume)
    except ApiException as exc:
        if exc.status != 403:
            raise
        report.warn(f"not allowed to read pv {volume}: read-only check skipped (ask an admin)")
        return
    sources = pv.to_dict().get("spec") or {}
    if any(isinstance(v, dict) and v.get("read_only") for v in sources.values()):
        report.ok(f"pvc {name} is on a read-only volume ({volume})")
        return
    report.warn(
        f"pvc {name}: its volume {volume} is writable, and KFP cannot mount a PVC read-only: "
        "a task could change the dataset; bind the PVC to a read-only PersistentVolume "
        "(docs/kubeflow.md, step 5)"
    )


def _checkpoint_pvc(api, namespace: str, settings: PipelineSettings, report: PrepareReport) -> None:
    # One training task writes at a time: ReadWriteOnce is enough, on the default class.
    name, size = settings.checkpoint_pvc, settings.checkpoint_pvc_size
    if _read_or_create_pvc(api, namespace, name, size, "ReadWriteOnce", None) is None:
        report.changed("created", f"pvc {name} ({size}, ReadWriteOnce) for training checkpoints")
    else:
        report.ok(f"pvc {name} exists (training checkpoints)")


def _tolerated(taint, tolerations: list[Toleration]) -> bool:
    """Kubernetes' rule: a toleration matches a taint on key, value (Equal) and effect."""
    for tol in tolerations:
        if tol.effect and tol.effect != taint.effect:
            continue
        if tol.operator == "Exists" and (not tol.key or tol.key == taint.key):
            return True
        if tol.operator == "Equal" and tol.key == taint.key and tol.value == taint.value:
            return True
    return False


def _gpu_nodes(api, settings: PipelineSettings, report: PrepareReport) -> None:
    selector = settings.gpu_label_selector()
    needed = max(res.gpus for res in settings.resources.values())
    if needed == 0:
        report.ok("no stage asks for a GPU")
        return
    try:
        nodes = api.list_node(label_selector=selector).items
    except ApiException as exc:
        if exc.status == 403:
            report.warn("not allowed to list nodes: GPU node check skipped (ask an admin)")
            return
        raise
    if not nodes:
        report.problem(
            f"no node has the label {selector}: the GPU stages (pretrain, train, extract) would "
            "stay Pending; label the GPU nodes or set pipeline.gpu_node_selector"
        )
        return
    usable = []
    for node in nodes:
        allocatable = (node.status.allocatable or {}) if node.status else {}
        gpus = int(str(allocatable.get(settings.gpu_resource, "0")) or 0)
        taints = [
            t
            for t in ((node.spec.taints or []) if node.spec else [])
            if t.effect in ("NoSchedule", "NoExecute")
        ]
        blocking = [t for t in taints if not _tolerated(t, settings.gpu_tolerations)]
        if gpus >= needed and not blocking:
            usable.append((node.metadata.name, gpus))
        elif blocking:
            names = ", ".join(f"{t.key}={t.value or ''}:{t.effect}" for t in blocking)
            report.warn(
                f"node {node.metadata.name} has taints the GPU tasks do not tolerate: {names}"
            )
        else:
            report.warn(
                f"node {node.metadata.name} has {gpus} allocatable {settings.gpu_resource}, "
                f"a task needs {needed}"
            )
    if not usable:
        report.problem(
            f"none of the {len(nodes)} node(s) labelled {selector} can run a GPU task "
            f"({needed} x {settings.gpu_resource}; is the NVIDIA device plugin installed?)"
        )
        return
    listed = ", ".join(f"{name} ({gpus})" for name, gpus in usable)
    report.ok(f"GPU nodes labelled {selector}: {listed}")
