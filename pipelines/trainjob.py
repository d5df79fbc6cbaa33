"""The TrainJob template of the multi-node train step (pipeline.train_nodes > 1).

Everything about the Kubeflow Trainer v2 TrainJob that the `pipeline` settings decide, built
at compile time and handed to the launcher task as JSON (components/trainjob.py adds the
run's name, command and MLflow parent run): the ClusterTrainingRuntime it refers to, the GPU
image, numNodes and numProcPerNode, each node's resources (pipeline.resources.train), the
job's deadline, the Secret's keys as env, and — through spec.runtimePatches on the runtime's
`node` replicated job — the dataset PVC (read-only, which the pipeline's own tasks cannot
have), the checkpoint PVC (inputs, checkpoints and the model), a memory-backed /dev/shm and
the GPU node selector and tolerations.

The fields follow the TrainJob CRD of kubeflow/trainer (manifests/base/crds/
trainer.kubeflow.org_trainjobs.yaml); tests/trainjob/trainjob_schema.yaml holds the part of its
schema used here and tests/test_trainjob_manifest.py checks the template against it.
"""

from __future__ import annotations

from typing import Any

from components.trainjob import GROUP, KIND, NODE, PATCH_MANAGER, VERSION
from pipelines.settings import PipelineSettings

RUNTIME_KIND = "ClusterTrainingRuntime"
# Volume names inside the nodes' pods.
DATASET_VOLUME = "dataset"
CHECKPOINT_VOLUME = "checkpoints"
SHM_VOLUME = "dshm"


def _node_resources(settings: PipelineSettings) -> dict[str, dict[str, Any]]:
    res = settings.resources["train"]
    requests: dict[str, Any] = {"cpu": res.cpu_request, "memory": res.memory_request}
    limits: dict[str, Any] = {"cpu": res.cpu_limit, "memory": res.memory_limit}
    if res.gpus:
        # Extended resources (GPUs) must have requests equal to limits.
        requests[settings.gpu_resource] = limits[settings.gpu_resource] = res.gpus
    return {"requests": requests, "limits": limits}


def _secret_env(settings: PipelineSettings) -> list[dict[str, Any]]:
    """The Secret's keys as the nodes' env: required ones block the pod when missing, optional
    ones are left unset (as the pipeline's own tasks get them)."""
    env = []
    for key in settings.secret_keys:
        ref: dict[str, Any] = {"name": settings.secret, "key": key}
        if key in settings.secret_optional:
            ref["optional"] = True
        env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _node_pod_patch(settings: PipelineSettings) -> dict[str, Any]:
    """What the nodes' pods get on top of the runtime's: volumes, mounts, GPU placement."""
    volumes: list[dict[str, Any]] = [
        {
            "name": DATASET_VOLUME,
            "persistentVolumeClaim": {"claimName": settings.dataset_pvc, "readOnly": True},
        },
        {
            "name": CHECKPOINT_VOLUME,
            "persistentVolumeClaim": {"claimName": settings.checkpoint_pvc},
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": DATASET_VOLUME, "mountPath": settings.dataset_mount, "readOnly": True},
        {"name": CHECKPOINT_VOLUME, "mountPath": settings.checkpoint_mount},
    ]
    spec: dict[str, Any] = {
        "volumes": volumes,
        "containers": [{"name": NODE, "volumeMounts": mounts}],
    }
    if settings.resources["train"].gpus:
        # DataLoader workers hand batches over through /dev/shm; a pod gets 64 MiB by default.
        volumes.append(
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}
        )
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        spec["nodeSelector"] = dict(settings.gpu_node_selector)
        spec["tolerations"] = [
            {k: v for k, v in tol.__dict__.items() if v is not None}
            for tol in settings.gpu_tolerations
        ]
    return spec


def trainjob_template(settings: PipelineSettings) -> dict[str, Any]:
    """The TrainJob without its name, namespace, command and run env (the launcher's part)."""
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": settings.train_runtime},
        "trainer": {
            "image": settings.image("gpu"),
            "numNodes": settings.train_nodes,
            "numProcPerNode": settings.train_proc_per_node,
            "resourcesPerNode": _node_resources(settings),
            "env": _secret_env(settings),
        },
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": NODE,
                                    "template": {
                                        "spec": {"template": {"spec": _node_pod_patch(settings)}}
                                    },
                                }
                            ]
                        }
                    }
                },
            }
        ],
    }
    hours = settings.resources["train"].timeout_hours
    if hours:
        # Past it the Trainer fails the job (reason DeadlineExceeded), and the task with it.
        spec["activeDeadlineSeconds"] = round(hours * 3600)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"labels": {"app.kubernetes.io/part-of": "psearch"}},
        "spec": spec,
    }
