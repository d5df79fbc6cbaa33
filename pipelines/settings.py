"""The Kubeflow pipeline's settings: images, resources, cluster objects.

They come from the `pipeline:` section of params.yaml (validated here, the
same way psearch.config validates the other sections), with two environment
variables taking precedence for the images, so CI can point a compile at the
tags it has just pushed without editing params.yaml:

    PSEARCH_IMAGE_CPU   image of the CPU stages (ingest, evaluate, register, ...)
    PSEARCH_IMAGE_GPU   image of the GPU stages (pretrain, train, extract)

Every image name in the project is read through `PipelineSettings.image`;
components and the DAG never spell one out. An image_cpu_digest / image_gpu_digest
pins the params.yaml image by digest (a re-pushed tag cannot change what runs); the
variables are used as given (they may carry their own `@sha256:`).
`python -m pipelines.settings cpu|gpu` prints the tag to build (used by `make images`).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from psearch.config import Params, build_section, load_params
from psearch.errors import PsearchError

IMAGE_ENV = {"cpu": "PSEARCH_IMAGE_CPU", "gpu": "PSEARCH_IMAGE_GPU"}

# Kubernetes quantities: "500m", "2", "4Gi", "512M".
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
# DNS-1123 names, as Kubernetes requires for Secrets and PVCs.
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# An OCI image digest, as `docker inspect --format '{{index .RepoDigests 0}}'` prints after the @.
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class TaskResources:
    """CPU and memory requests/limits of one task, and the GPUs it asks for."""

    # Kubernetes quantities; plain numbers (cpu_request: 2) are accepted too.
    cpu_request: str | int | float = "1"
    cpu_limit: str | int | float = "2"
    memory_request: str | int | float = "2Gi"
    memory_limit: str | int | float = "4Gi"
    gpus: int = 0
    # The pod's activeDeadlineSeconds, in hours (each retry gets its own); 0: no limit.
    timeout_hours: float = 0

    def __post_init__(self) -> None:
        for key in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
            setattr(self, key, str(getattr(self, key)))


def _default_resources() -> dict[str, TaskResources]:
    return {
        "tracking": TaskResources("250m", "500m", "512Mi", "1Gi"),
        "dataset_digest": TaskResources("250m", "1", "512Mi", "1Gi"),
        "ingest": TaskResources("1", "2", "2Gi", "4Gi"),
        "pretrain": TaskResources("4", "8", "16Gi", "16Gi", gpus=1, timeout_hours=24),
        # With pipeline.train_nodes > 1: each TrainJob node's resources and the job's deadline.
        "train": TaskResources("8", "8", "32Gi", "32Gi", gpus=1, timeout_hours=72),
        # The task that launches and follows that TrainJob (it waits as long as the job runs).
        "train_nodes": TaskResources("250m", "500m", "512Mi", "1Gi"),
        "extract": TaskResources("4", "8", "16Gi", "16Gi", gpus=1, timeout_hours=12),
        "extract_merge": TaskResources("1", "2", "4Gi", "8Gi"),
        "evaluate": TaskResources("2", "4", "8Gi", "8Gi"),
        "index": TaskResources("2", "4", "8Gi", "16Gi"),
        "register": TaskResources("500m", "1", "1Gi", "2Gi"),
        "promote": TaskResources("500m", "1", "1Gi", "2Gi"),
        "close_runs": TaskResources("250m", "500m", "512Mi", "1Gi"),
    }


@dataclass
class Toleration:
    key: str = "nvidia.com/gpu"
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


@dataclass
class PipelineSettings:
    """The `pipeline:` section of params.yaml (every key optional)."""

    name: str = "person-search"
    image_cpu: str = "ghcr.io/psearch/psearch:0.1.0"
    image_gpu: str = "ghcr.io/psearch/psearch-cuda:0.1.0"
    # "sha256:<64 hex>": the tasks run image_cpu/image_gpu pinned at that digest.
    image_cpu_digest: str | None = None
    image_gpu_digest: str | None = None
    # imagePullPolicy of every task; unset: IfNotPresent for an image pinned by digest (it
    # cannot change), Always for a tag (a re-pushed tag is pulled again).
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    # Kubernetes Secret whose keys become the tasks' environment (see `psearch pipeline prepare`).
    secret: str = "psearch-credentials"
    # Keys every task needs; the pod does not start without them.
    secret_required: list[str] = field(default_factory=lambda: ["MLFLOW_TRACKING_URI"])
    # Keys passed on when present in the Secret.
    secret_optional: list[str] = field(
        default_factory=lambda: [
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        ]
    )
    # The raw dataset lives on this PVC, mounted at dataset_mount in the stages that read it.
    # kfp-kubernetes cannot mount a PVC read-only: the volume itself must be (docs/kubeflow.md).
    dataset_pvc: str = "psearch-dataset"
    dataset_mount: str = "/mnt/dataset"
    dataset_pvc_size: str = "50Gi"
    dataset_pvc_access_mode: Literal["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce"] = (
        "ReadWriteMany"
    )
    dataset_storage_class: str | None = None
    # Training checkpoints live on this PVC (under <mount>/<KFP run id>/<stage>/), so a retried
    # pretrain/train task resumes where the lost pod stopped; null keeps them in the pod.
    checkpoint_pvc: str | None = "psearch-checkpoints"
    checkpoint_mount: str = "/mnt/checkpoints"
    checkpoint_pvc_size: str = "20Gi"
    extract_shards: int = 4
    extract_retries: int = 2
    # Retries of a failed pretrain/train task (a preempted GPU node); they resume.
    train_retries: int = 2
    # The memory-backed /dev/shm of the GPU tasks (DataLoader workers pass batches through
    # it; the pod default is 64 MiB). It counts against the task's memory limit.
    shm_size: str = "8Gi"
    # Training on several nodes (docs/kubeflow.md): > 1 runs the train step as a Kubeflow
    # Trainer v2 TrainJob of that many nodes (resources.train per node), each running
    # train_proc_per_node processes, on the ClusterTrainingRuntime train_runtime; 1 trains in
    # the task's own pod.
    train_nodes: int = 1
    train_proc_per_node: int = 1
    train_runtime: str = "torch-distributed"
    gpu_resource: str = "nvidia.com/gpu"
    # Where GPU tasks may run: node labels they select and taints they tolerate.
    gpu_node_selector: dict[str, Any] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    gpu_tolerations: list[Toleration] = field(default_factory=lambda: [Toleration()])
    resources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        overrides = self.resources
        known = _default_resources()
        for stage in overrides:
            if stage not in known:
                raise PsearchError(
                    f"pipeline.resources.{stage}: unknown stage (known: {', '.join(known)})"
                )
        # Settings for one stage override the defaults key by key.
        self.resources = {
            stage: build_section(
                TaskResources,
                {**defaults.__dict__, **(overrides.get(stage) or {})},
                f"pipeline.resources.{stage}",
            )
            for stage, defaults in known.items()
        }
        for stage, res in self.resources.items():
            for key in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
                value = getattr(res, key)
                if not _QUANTITY.match(value):
                    raise PsearchError(
                        f"pipeline.resources.{stage}.{key}: {value!r} is not a Kubernetes quantity"
                    )
            if res.gpus < 0:
                raise PsearchError(f"pipeline.resources.{stage}.gpus: must be >= 0")
            if res.timeout_hours < 0:
                raise PsearchError(f"pipeline.resources.{stage}.timeout_hours: must be >= 0")
        for key in ("secret", "dataset_pvc", "checkpoint_pvc"):
            if getattr(self, key) is not None and not _DNS_NAME.match(getattr(self, key)):
                raise PsearchError(
                    f"pipeline.{key}: {getattr(self, key)!r} is not a valid Kubernetes name"
                )
        if self.extract_shards < 1:
            raise PsearchError(f"pipeline.extract_shards: must be >= 1, got {self.extract_shards}")
        self._check_train_nodes()
        for key in ("extract_retries", "train_retries"):
            if getattr(self, key) < 0:
                raise PsearchError(f"pipeline.{key}: must be >= 0")
        for key in ("dataset_mount", "checkpoint_mount"):
            if not getattr(self, key).startswith("/"):
                raise PsearchError(f"pipeline.{key}: {getattr(self, key)!r} must be absolute")
        for key in ("shm_size", "checkpoint_pvc_size", "dataset_pvc_size"):
            if not _QUANTITY.match(str(getattr(self, key))):
                raise PsearchError(
                    f"pipeline.{key}: {getattr(self, key)!r} is not a Kubernetes quantity"
                )
        for kind in IMAGE_ENV:
            digest = getattr(self, f"image_{kind}_digest")
            if digest is not None and not _DIGEST.match(digest):
                raise PsearchError(
                    f"pipeline.image_{kind}_digest: {digest!r} is not a digest (sha256:<64 hex>)"
                )
        self.gpu_node_selector = {str(k): str(v) for k, v in self.gpu_node_selector.items()}

    def _check_train_nodes(self) -> None:
        for key in ("train_nodes", "train_proc_per_node"):
            if getattr(self, key) < 1:
                raise PsearchError(f"pipeline.{key}: must be >= 1, got {getattr(self, key)}")
        if not _DNS_NAME.match(self.train_runtime):
            raise PsearchError(
                f"pipeline.train_runtime: {self.train_runtime!r} is not a valid Kubernetes name"
            )
        gpus = self.resources["train"].gpus
        if self.train_nodes > 1 and gpus and self.train_proc_per_node > gpus:
            raise PsearchError(
                f"pipeline.train_proc_per_node: {self.train_proc_per_node} processes on a node "
                f"of {gpus} GPU(s) (resources.train.gpus); one process per GPU"
            )
        if self.train_nodes > 1 and not self.checkpoint_pvc:
            raise PsearchError(
                "pipeline.train_nodes: several nodes share their inputs and the model through "
                "the checkpoint PVC; set pipeline.checkpoint_pvc"
            )

    def image(self, kind: Literal["cpu", "gpu"]) -> str:
        """The image for CPU or GPU stages: $PSEARCH_IMAGE_CPU/GPU as given, else params.yaml's
        image_cpu/gpu, pinned by image_cpu/gpu_digest when one is set."""
        if os.environ.get(IMAGE_ENV[kind]):
            return os.environ[IMAGE_ENV[kind]]
        image, digest = getattr(self, f"image_{kind}"), getattr(self, f"image_{kind}_digest")
        if digest is None:
            return image
        # name:tag@sha256:… is valid and the digest wins; a different pin is a contradiction.
        name, _, pinned = image.partition("@")
        if pinned and pinned != digest:
            raise PsearchError(
                f"pipeline.image_{kind}: {image!r} is pinned at another digest than "
                f"image_{kind}_digest {digest}"
            )
        return f"{name}@{digest}"

    def build_tag(self, kind: Literal["cpu", "gpu"]) -> str:
        """What `make images` tags its build with: the image without a digest."""
        return self.image(kind).partition("@")[0]

    def pull_policy(self, kind: Literal["cpu", "gpu"]) -> str:
        """The tasks' imagePullPolicy on that image (see `image_pull_policy`)."""
        if self.image_pull_policy:
            return self.image_pull_policy
        return "IfNotPresent" if "@sha256:" in self.image(kind) else "Always"

    def images(self) -> dict[str, str]:
        """{"cpu": image, "gpu": image}: what the components are built on."""
        return {kind: self.image(kind) for kind in IMAGE_ENV}

    def checkpoint_root(self) -> str:
        """Where training tasks keep checkpoints: the checkpoint PVC's mount, "" without one."""
        return self.checkpoint_mount if self.checkpoint_pvc else ""

    @property
    def secret_keys(self) -> list[str]:
        return [*self.secret_required, *self.secret_optional]

    def gpu_label_selector(self) -> str:
        """The node selector as a Kubernetes label selector string ("k=v,k2=v2")."""
        return ",".join(f"{k}={v}" for k, v in self.gpu_node_selector.items())


def load_settings(section: dict[str, Any] | None) -> PipelineSettings:
    """Validated settings from the `pipeline` section of params (a plain mapping)."""
    return build_section(PipelineSettings, section or {}, "pipeline")


def settings_for(params: Params) -> PipelineSettings:
    """The validated settings of `params`' pipeline section."""
    return load_settings(params.pipeline)


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind not in IMAGE_ENV:
        sys.exit("usage: python -m pipelines.settings cpu|gpu")
    print(settings_for(load_params()).build_tag(kind))
