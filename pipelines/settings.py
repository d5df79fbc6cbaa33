"""The Kubeflow pipeline's settings: images, resources, cluster objects.

They come from the `pipeline:` section of params.yaml (validated here, the
same way psearch.config validates the other sections), with two environment
variables taking precedence for the images, so CI can point a compile at the
tags it has just pushed without editing params.yaml:

    PSEARCH_IMAGE_CPU   image of the CPU stages (ingest, evaluate, register, ...)
    PSEARCH_IMAGE_GPU   image of the GPU stages (pretrain, train, extract)

Every image name in the project is read through `PipelineSettings.image`;
components and the DAG never spell one out. `python -m pipelines.settings cpu|gpu`
prints one (used by `make images`).
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


@dataclass
class TaskResources:
    """CPU and memory requests/limits of one task, and the GPUs it asks for."""

    # Kubernetes quantities; plain numbers (cpu_request: 2) are accepted too.
    cpu_request: str | int | float = "1"
    cpu_limit: str | int | float = "2"
    memory_request: str | int | float = "2Gi"
    memory_limit: str | int | float = "4Gi"
    gpus: int = 0

    def __post_init__(self) -> None:
        for key in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
            setattr(self, key, str(getattr(self, key)))


def _default_resources() -> dict[str, TaskResources]:
    return {
        "tracking": TaskResources("250m", "500m", "512Mi", "1Gi"),
        "ingest": TaskResources("1", "2", "2Gi", "4Gi"),
        "pretrain": TaskResources("4", "8", "16Gi", "16Gi", gpus=1),
        "train": TaskResources("8", "8", "32Gi", "32Gi", gpus=1),
        "extract": TaskResources("4", "8", "16Gi", "16Gi", gpus=1),
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
    # The raw dataset lives on this PVC, mounted read-only at dataset_mount in the data stages.
    dataset_pvc: str = "psearch-dataset"
    dataset_mount: str = "/mnt/dataset"
    dataset_pvc_size: str = "50Gi"
    dataset_pvc_access_mode: Literal["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce"] = (
        "ReadWriteMany"
    )
    dataset_storage_class: str | None = None
    extract_shards: int = 4
    extract_retries: int = 2
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
        for key in ("secret", "dataset_pvc"):
            if not _DNS_NAME.match(getattr(self, key)):
                raise PsearchError(
                    f"pipeline.{key}: {getattr(self, key)!r} is not a valid Kubernetes name"
                )
        if self.extract_shards < 1:
            raise PsearchError(f"pipeline.extract_shards: must be >= 1, got {self.extract_shards}")
        if self.extract_retries < 0:
            raise PsearchError("pipeline.extract_retries: must be >= 0")
        if not self.dataset_mount.startswith("/"):
            raise PsearchError(f"pipeline.dataset_mount: {self.dataset_mount!r} must be absolute")
        self.gpu_node_selector = {str(k): str(v) for k, v in self.gpu_node_selector.items()}

    def image(self, kind: Literal["cpu", "gpu"]) -> str:
        """The image for CPU or GPU stages: $PSEARCH_IMAGE_CPU/GPU, else params.yaml."""
        return os.environ.get(IMAGE_ENV[kind]) or getattr(self, f"image_{kind}")

    def images(self) -> dict[str, str]:
        """{"cpu": image, "gpu": image}: what the components are built on."""
        return {kind: self.image(kind) for kind in IMAGE_ENV}

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
    print(settings_for(load_params()).image(kind))
