"""The multi-node train step's TrainJob and the compiled pipeline that launches it.

The TrainJob the launcher creates (pipelines.trainjob's template completed by
components.trainjob) is checked against the fields of the Kubeflow Trainer v2 CRD
(tests/trainjob/trainjob_schema.yaml, trimmed from kubeflow/trainer's manifests), closed to
any other field; the compiled pipeline with pipeline.train_nodes > 1 has the `train-nodes`
task in place of `train`, on the CPU image, feeding the same downstream tasks; and
docs/kubeflow.md asks for exactly the RBAC rules the launcher needs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_pipeline_compile import _all_tasks, _executor, _stages_dag
from trainjob_fixtures import schema_errors

from components import trainjob
from pipelines.compile import compile_pipeline
from pipelines.settings import settings_for
from pipelines.trainjob import trainjob_template
from psearch.config import load_params
from psearch.errors import PsearchError

REPO = Path(__file__).resolve().parents[1]
MULTI = [
    "pipeline.train_nodes=3",
    "pipeline.train_proc_per_node=2",
    "pipeline.resources={train: {gpus: 2}}",
]


@pytest.fixture(autouse=True)
def _images_from_params(monkeypatch):
    monkeypatch.delenv("PSEARCH_IMAGE_CPU", raising=False)
    monkeypatch.delenv("PSEARCH_IMAGE_GPU", raising=False)


def _settings(overrides: list[str]):
    return settings_for(load_params(REPO / "params.yaml", overrides))


def _complete(template: dict) -> dict:
    paths = trainjob.staging_paths("/mnt/checkpoints", "run-1")
    return trainjob.complete_trainjob(
        template,
        trainjob.trainjob_name("run-1"),
        "team-a",
        trainjob.node_command(paths, with_init=True),
        {"PSEARCH_PARENT_RUN_ID": "abc"},
        annotations={"psearch/kfp-run-id": "run-1"},
    )


def _pod_patch(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == trainjob.NODE
    return node["template"]["spec"]["template"]["spec"]


def test_the_trainjob_has_only_crd_fields():
    job = _complete(trainjob_template(_settings(MULTI)))
    assert schema_errors(job) == []
    spec = job["spec"]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert trainer["image"] == "ghcr.io/psearch/psearch-cuda:0.1.0"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 2)
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2},
    }
    assert trainer["command"][:4] == ["torchrun", "-m", "psearch", "train"]
    assert spec["activeDeadlineSeconds"] == 72 * 3600


def test_the_nodes_get_the_secret_the_pvcs_and_the_gpu_placement():
    job = _complete(trainjob_template(_settings(MULTI)))
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"] == {
        "secretKeyRef": {"name": "psearch-credentials", "key": "MLFLOW_TRACKING_URI"}
    }
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["PSEARCH_PARENT_RUN_ID"] == {"name": "PSEARCH_PARENT_RUN_ID", "value": "abc"}
    pod = _pod_patch(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dataset"]["persistentVolumeClaim"] == {
        "claimName": "psearch-dataset",
        "readOnly": True,
    }
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "psearch-checkpoints"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/mnt/dataset"] == {
        "name": "dataset",
        "mountPath": "/mnt/dataset",
        "readOnly": True,
    }
    assert mounts["/mnt/checkpoints"]["name"] == "checkpoints"
    assert mounts["/dev/shm"]["name"] == "dshm"
    # Everything the nodes read or write is under a mounted PVC.
    paths = [a for a in job["spec"]["trainer"]["command"] if a.startswith("/")]
    assert paths and all(p.startswith("/mnt/checkpoints/run-1/train-nodes/") for p in paths)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_cpu_nodes_without_deadline_and_another_runtime():
    overrides = [
        "pipeline.train_nodes=2",
        "pipeline.train_runtime=torch-cpu",
        "pipeline.resources={train: {gpus: 0, timeout_hours: 0}}",
    ]
    job = _complete(trainjob_template(_settings(overrides)))
    assert schema_errors(job) == []
    assert job["spec"]["runtimeRef"]["name"] == "torch-cpu"
    assert "activeDeadlineSeconds" not in job["spec"]
    assert "nvidia.com/gpu" not in job["spec"]["trainer"]["resourcesPerNode"]["limits"]
    pod = _pod_patch(job)
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert [v["name"] for v in pod["volumes"]] == ["dataset", "checkpoints"]


def test_the_name_follows_the_crd_rules_for_any_run_id():
    for run_id in ("5f0c4c3e-8d1b-4e2a-9f3c-7a6b5c4d3e2f", "Run_With.Odd/Chars", "x" * 300):
        name = trainjob.trainjob_name(run_id)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
        assert name == trainjob.trainjob_name(run_id)  # every retry finds the same job
    assert trainjob.trainjob_name("a") != trainjob.trainjob_name("b")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("pipeline.train_nodes=0", "pipeline.train_nodes: must be >= 1"),
        ("pipeline.train_proc_per_node=0", "pipeline.train_proc_per_node: must be >= 1"),
        ("pipeline.train_runtime=Torch_Distributed", "pipeline.train_runtime: 'Torch_Distributed'"),
        ("pipeline.train_proc_per_node=4", "pipeline.train_proc_per_node: 4 processes on a node"),
        ("pipeline.checkpoint_pvc=null", "pipeline.train_nodes: several nodes share"),
    ],
)
def test_bad_multi_node_settings_are_one_line_errors(override, fragment):
    with pytest.raises(PsearchError) as exc:
        _settings(["pipeline.train_nodes=2", override])
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def compiled_multi(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PSEARCH_IMAGE_CPU", raising=False)
        mp.delenv("PSEARCH_IMAGE_GPU", raising=False)
        out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
        compile_pipeline(load_params(REPO / "params.yaml", MULTI), out)
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_compiled_pipeline_launches_a_trainjob(compiled_multi):
    spec, platform = compiled_multi
    root = _stages_dag(spec)
    assert "train" not in root
    task = root["train-nodes"]
    assert set(task["dependentTasks"]) == {"ingest", "pretrain", "tracking"}
    assert set(task["inputs"]["artifacts"]) == {"manifests", "idnet"}
    # A small CPU task that only launches and follows: no GPU, the CPU image.
    executor = _executor(spec, "train-nodes")
    assert executor["image"] == "ghcr.io/psearch/psearch:0.1.0"
    assert "accelerator" not in executor["resources"]
    assert "from components.trainjob import run_trainjob" in " ".join(executor["command"])
    # The TrainJob is the settings' template, as compiled.
    template = json.loads(task["inputs"]["parameters"]["trainjob"]["runtimeValue"]["constant"])
    assert template == trainjob_template(_settings(MULTI))
    assert schema_errors(_complete(template)) == []
    # Retried, resuming: the checkpoint PVC (where the model comes back) and a retry policy.
    assert task["retryPolicy"]["maxRetryCount"] == 2
    mounts = platform["exec-train-nodes"]["pvcMount"]
    assert [m["constant"] for m in mounts] == ["psearch-checkpoints"]
    # The model it outputs is what every later task takes, as from `train`.
    produced = {"outputArtifactKey": "model", "producerTask": "train-nodes"}
    tasks = _all_tasks(spec)
    for consumer in ("register", "index"):
        assert tasks[consumer]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == produced
    loop = next(name for name in root if name.startswith("for-loop"))  # the extraction shards
    assert "train-nodes" in root[loop]["dependentTasks"]
    assert produced in [
        a.get("taskOutputArtifact") for a in root[loop]["inputs"]["artifacts"].values()
    ]


def test_docs_ask_for_the_rbac_the_launcher_uses():
    """docs/kubeflow.md's Role for the run's service account grants what RBAC_RULES lists
    (tests/test_trainjob_api.py checks every call the launcher makes against RBAC_RULES)."""
    text = (REPO / "docs" / "kubeflow.md").read_text()
    section = text.split("## Training on several nodes", 1)[1].split("\n## ", 1)[0]
    roles = [
        doc
        for block in re.findall(r"```yaml\n(.*?)```", section, re.S)
        for doc in yaml.safe_load_all(block)
        if doc and doc.get("kind") == "Role"
    ]
    assert len(roles) == 1
    assert roles[0]["rules"] == [dict(rule) for rule in trainjob.RBAC_RULES]
    assert "torch-distributed" in section and "ClusterTrainingRuntime" in section
