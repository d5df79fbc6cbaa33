"""The compiled Kubeflow pipeline (KFP IR): stages, edges, fan-out, condition, cluster settings,
and the cluster hardening of issue #15 (cache keyed on the data, training retries, timeouts and
checkpoints on a PVC, digest-pinned images and pull policy, a memory-backed /dev/shm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.compile import compile_pipeline
from psearch.config import load_params
from psearch.errors import PsearchError

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "tracking",
    "dataset-digest",
    "ingest",
    "pretrain",
    "train",
    "extract",
    "extract-merge",
    "evaluate",
    "index",
    "register",
    "promote",
    "close-runs",
}
GPU_STAGES = {"pretrain", "train", "extract"}


def _compile(tmp_path: Path, overrides: list[str] | None = None) -> tuple[dict, dict]:
    out = tmp_path / "pipeline.yaml"
    compile_pipeline(load_params(REPO / "params.yaml", overrides or []), out)
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, monkeypatch_module):
    return _compile(tmp_path_factory.mktemp("ir"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    # Images come from params.yaml here, whatever the calling shell exports.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PSEARCH_IMAGE_CPU", raising=False)
        mp.delenv("PSEARCH_IMAGE_GPU", raising=False)
        yield mp


def _all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, nested ones (loop, condition) included."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _stages_dag(spec: dict) -> dict[str, dict]:
    """The tasks inside the pipeline's dsl.ExitHandler: every stage but close-runs."""
    handler = spec["root"]["dag"]["tasks"]["exit-handler-1"]
    return spec["components"][handler["componentRef"]["name"]]["dag"]["tasks"]


def _executor(spec: dict, task: str) -> dict:
    return spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]


def test_every_stage_is_a_task_on_its_image(compiled):
    spec, _ = compiled
    tasks = _all_tasks(spec)
    assert set(tasks) >= STAGES
    params = load_params(REPO / "params.yaml")
    settings = params.pipeline
    cpu = settings.get("image_cpu", "ghcr.io/psearch/psearch:0.1.0")
    gpu = settings.get("image_gpu", "ghcr.io/psearch/psearch-cuda:0.1.0")
    for stage in STAGES:
        image = _executor(spec, stage)["image"]
        assert image == (gpu if stage in GPU_STAGES else cpu), stage
        # The component bodies call psearch and components.runtime, installed in the image;
        # kfp is not pip-installed at run time.
        program = " ".join(_executor(spec, stage)["command"])
        assert "pip install" not in program
        assert "from psearch" in program or "from components.runtime" in program


def test_dag_edges(compiled):
    spec, _ = compiled
    root = _stages_dag(spec)

    def deps(name: str) -> set[str]:
        return set(root[name].get("dependentTasks", []))

    assert deps("dataset-digest") == set()
    assert deps("ingest") == {"dataset-digest"}
    assert deps("pretrain") == {"ingest", "tracking"}
    assert deps("train") == {"ingest", "pretrain", "tracking"}
    loop = next(name for name in root if name.startswith("for-loop"))
    assert deps(loop) == {"dataset-digest", "ingest", "train"}
    assert deps("extract-merge") == {loop}
    assert deps("evaluate") == {"extract-merge", "ingest"}
    assert deps("index") == {"extract-merge", "ingest", "train"}  # beside evaluate
    assert deps("register") == {"evaluate", "tracking", "train"}
    condition = next(name for name in root if name.startswith("condition"))
    assert deps(condition) == {"register"}


def test_a_recipe_without_pretraining_compiles_without_the_pretrain_task(tmp_path):
    # oim-resnet50 has no IDNet stage: the DAG leaves the task out and train takes no idnet.
    spec, _ = _compile(tmp_path, ["pretrain.enabled=false"])
    root = _stages_dag(spec)
    assert "pretrain" not in root
    assert set(root["train"].get("dependentTasks", [])) == {"ingest", "tracking"}
    assert "idnet" not in root["train"]["inputs"].get("artifacts", {})
    train_inputs = spec["components"]["comp-train"]["inputDefinitions"]["artifacts"]
    assert train_inputs["idnet"]["isOptional"] is True


def test_close_runs_is_the_exit_handler_of_every_stage(compiled):
    spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "close-runs"}
    assert {"tracking", "ingest", "train", "register"} <= set(_stages_dag(spec))
    close = root["close-runs"]
    # It runs once the handler's tasks end, failed or not, and gets their final state.
    assert close["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert close["inputs"]["parameters"]["status"] == {
        "taskFinalStatus": {"producerTask": "exit-handler-1"}
    }
    kfp_run_id = close["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"]
    assert kfp_run_id == "{{$.pipeline_job_uuid}}"  # the tag the tracking task sets


def test_extraction_fans_out_over_shards_and_merges_collected(compiled):
    spec, _ = compiled
    root = _stages_dag(spec)
    loop = next(t for name, t in root.items() if name.startswith("for-loop"))
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1, 2, 3]
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"extract"}
    args = body["extract"]["inputs"]["parameters"]
    assert args["shard_count"]["runtimeValue"]["constant"] == 4
    assert "componentInputParameter" in args["shard_index"]
    # dsl.Collected: the merge takes the loop's list of shard outputs.
    merge_in = root["extract-merge"]["inputs"]["artifacts"]["parts"]
    assert merge_in["taskOutputArtifact"]["producerTask"].startswith("for-loop")
    merge_def = spec["components"]["comp-extract-merge"]["inputDefinitions"]["artifacts"]
    assert merge_def["parts"]["isArtifactList"] is True


def test_promotion_is_conditional_on_beating_the_champion(compiled):
    spec, _ = compiled
    root = _stages_dag(spec)
    condition = next(t for name, t in root.items() if name.startswith("condition"))
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--register-Output'] != ''"
    )
    body = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"promote"}
    assert "promote" not in root
    # promote gets the version register decided on.
    version = body["promote"]["inputs"]["parameters"]["version"]
    assert version == {"componentInputParameter": "pipelinechannel--register-Output"}
    outputs = spec["components"]["comp-register"]["outputDefinitions"]["parameters"]
    assert outputs["Output"]["parameterType"] == "STRING"
    # evaluate logs Output[Metrics] and returns the decision value.
    evaluate = spec["components"]["comp-evaluate"]["outputDefinitions"]
    assert evaluate["artifacts"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert evaluate["parameters"]["Output"]["parameterType"] == "NUMBER_DOUBLE"


def test_gpu_requests_only_on_gpu_stages_and_resources_everywhere(compiled):
    spec, platform = compiled
    for stage in STAGES:
        resources = _executor(spec, stage)["resources"]
        for key in ("CpuRequest", "CpuLimit", "MemoryRequest", "MemoryLimit"):
            assert resources.get(f"resource{key}"), (stage, key)
        config = platform.get(f"exec-{stage}", {})
        if stage in GPU_STAGES:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", stage
            assert int(resources["accelerator"]["resourceCount"]) >= 1
            assert config["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                config["tolerations"]
            )
        else:
            assert "accelerator" not in resources, stage
            assert "nodeSelector" not in config and "tolerations" not in config, stage


def test_credentials_come_from_the_secret_and_the_dataset_from_the_pvc(compiled):
    spec, platform = compiled
    tracked = {"tracking", "pretrain", "train", "register", "promote", "close-runs"}
    for stage in STAGES:
        config = platform.get(f"exec-{stage}", {})
        if stage in tracked:
            required, optional = config["secretAsEnv"]
            assert required["secretName"] == "psearch-credentials"
            assert required["optional"] is False
            assert [k["envVar"] for k in required["keyToEnv"]] == ["MLFLOW_TRACKING_URI"]
            assert optional["optional"] is True
            env = {k["envVar"] for k in optional["keyToEnv"]}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} <= env
        else:
            assert "secretAsEnv" not in config, stage
        mounts = config.get("pvcMount", [])
        if stage in {"dataset-digest", "ingest", "pretrain", "train", "extract"}:
            assert mounts[0] == {
                "constant": "psearch-dataset",
                "mountPath": "/mnt/dataset",
                "pvcNameParameter": {"runtimeValue": {"constant": "psearch-dataset"}},
            }
            # The training tasks' checkpoints go to their own PVC (test_training_...).
            assert len(mounts) == (2 if stage in {"pretrain", "train"} else 1), stage
        else:
            assert mounts == [], stage
    # No credential is a literal in the spec: no task sets environment variables itself.
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert "env" not in executor["container"], name
    # The dataset root defaults to the PVC's mount point.
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["dataset_root"]["defaultValue"] == "/mnt/dataset"


def test_caching_and_retries(compiled):
    spec, _ = compiled
    tasks = _all_tasks(spec)

    def cached(name: str) -> bool:
        return tasks[name].get("cachingOptions", {}).get("enableCache", False)

    assert cached("ingest")
    for stage in ("tracking", "dataset-digest", "pretrain", "train", "register", "promote"):
        assert not cached(stage), stage
    assert not cached("close-runs")
    retry = tasks["extract"]["retryPolicy"]
    assert retry["maxRetryCount"] == 2 and retry["backoffDuration"] == "60s"
    for stage in ("pretrain", "train"):
        retry = tasks[stage]["retryPolicy"]
        assert retry["maxRetryCount"] == 2 and retry["backoffDuration"] == "300s", stage
    retried = {"extract", "pretrain", "train"}
    assert all("retryPolicy" not in t for name, t in tasks.items() if name not in retried)


def test_the_pvc_readers_cache_is_keyed_on_the_dataset_digest(compiled):
    """KFP's cache key holds a mounted PVC's name, not its content: ingest and extract (which
    read the images there) take the digest a never-cached task computes on every run."""
    spec, _ = compiled
    tasks = _all_tasks(spec)
    digest = tasks["dataset-digest"]
    assert digest["inputs"]["parameters"]["dataset_root"] == {
        "componentInputParameter": "pipelinechannel--dataset_root"  # the pipeline's parameter
    }
    assert tasks["ingest"]["inputs"]["parameters"]["dataset_digest"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "dataset-digest"}
    }
    # Inside the ParallelFor the digest arrives as the loop's input.
    extract = tasks["extract"]["inputs"]["parameters"]["dataset_digest"]
    assert extract == {"componentInputParameter": "pipelinechannel--dataset-digest-Output"}
    for stage in ("ingest", "extract"):
        inputs = spec["components"][f"comp-{stage}"]["inputDefinitions"]["parameters"]
        assert inputs["dataset_digest"]["parameterType"] == "STRING"


def test_training_is_retried_with_a_timeout_and_checkpoints_on_a_pvc(tmp_path, compiled):
    spec, platform = compiled
    tasks = _all_tasks(spec)
    hours = {"pretrain": 24, "train": 72, "extract": 12}
    for stage in STAGES:
        deadline = platform.get(f"exec-{stage}", {}).get("activeDeadlineSeconds")
        assert deadline == (str(hours[stage] * 3600) if stage in hours else None), stage
    for stage in ("pretrain", "train"):
        mounts = platform[f"exec-{stage}"]["pvcMount"]
        assert {"constant": "psearch-checkpoints", "mountPath": "/mnt/checkpoints"}.items() <= (
            mounts[1].items()
        )
        args = tasks[stage]["inputs"]["parameters"]
        assert args["checkpoint_root"] == {"runtimeValue": {"constant": "/mnt/checkpoints"}}
        # The KFP run id: the same in every retry of the task, another in the next run.
        assert args["kfp_run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}

    spec, platform = _compile(
        tmp_path,
        [
            "pipeline.checkpoint_pvc=null",
            "pipeline.train_retries=5",
            "pipeline.resources={train: {timeout_hours: 0.5}, pretrain: {timeout_hours: 0}}",
        ],
    )
    tasks = _all_tasks(spec)
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 5
    assert tasks["train"]["inputs"]["parameters"]["checkpoint_root"] == {
        "runtimeValue": {"constant": ""}
    }
    assert len(platform["exec-train"]["pvcMount"]) == 1  # only the dataset
    assert platform["exec-train"]["activeDeadlineSeconds"] == "1800"
    assert "activeDeadlineSeconds" not in platform["exec-pretrain"]


def test_gpu_tasks_get_a_memory_backed_dev_shm(tmp_path, compiled):
    _, platform = compiled
    for stage in STAGES:
        mounts = platform.get(f"exec-{stage}", {}).get("emptyDirMounts")
        if stage in GPU_STAGES:
            assert mounts == [
                {
                    "medium": "Memory",
                    "mountPath": "/dev/shm",
                    "sizeLimit": "8Gi",
                    "volumeName": "dshm",
                }
            ], stage
        else:
            assert mounts is None, stage
    _, platform = _compile(tmp_path, ["pipeline.shm_size=2Gi"])
    assert platform["exec-train"]["emptyDirMounts"][0]["sizeLimit"] == "2Gi"


DIGEST = "sha256:" + "ab" * 32


def test_images_are_pinned_by_digest_and_pulled_by_policy(tmp_path, compiled, monkeypatch_module):
    spec, platform = compiled
    # A mutable tag: pulled again every time, so a re-pushed tag is never stale on a node.
    for stage in STAGES:
        assert platform[f"exec-{stage}"]["imagePullPolicy"] == "Always", stage

    spec, platform = _compile(tmp_path, [f"pipeline.image_gpu_digest={DIGEST}"])
    assert _executor(spec, "train")["image"] == f"ghcr.io/psearch/psearch-cuda:0.1.0@{DIGEST}"
    assert _executor(spec, "ingest")["image"] == "ghcr.io/psearch/psearch:0.1.0"
    assert platform["exec-train"]["imagePullPolicy"] == "IfNotPresent"  # a digest cannot change
    assert platform["exec-ingest"]["imagePullPolicy"] == "Always"

    spec, platform = _compile(
        tmp_path, [f"pipeline.image_cpu_digest={DIGEST}", "pipeline.image_pull_policy=Never"]
    )
    assert _executor(spec, "ingest")["image"] == f"ghcr.io/psearch/psearch:0.1.0@{DIGEST}"
    assert {platform[f"exec-{stage}"]["imagePullPolicy"] for stage in STAGES} == {"Never"}

    # The environment's image is used as given, with its own digest if it has one.
    monkeypatch_module.setenv("PSEARCH_IMAGE_CPU", f"registry.example/psearch@{DIGEST}")
    spec, platform = _compile(tmp_path, [f"pipeline.image_cpu_digest=sha256:{'cd' * 32}"])
    monkeypatch_module.delenv("PSEARCH_IMAGE_CPU")
    assert _executor(spec, "ingest")["image"] == f"registry.example/psearch@{DIGEST}"
    assert platform["exec-ingest"]["imagePullPolicy"] == "IfNotPresent"

    # name:tag@digest is valid (the digest wins); two different pins are a contradiction.
    tagged = f"ghcr.io/p/g:1@{DIGEST}"
    spec, _ = _compile(
        tmp_path, [f"pipeline.image_gpu={tagged}", f"pipeline.image_gpu_digest={DIGEST}"]
    )
    assert _executor(spec, "train")["image"] == f"ghcr.io/p/g:1@{DIGEST}"
    other = f"pipeline.image_gpu_digest=sha256:{'ef' * 32}"
    with pytest.raises(PsearchError, match="pinned at another digest than image_gpu_digest"):
        _compile(tmp_path, [f"pipeline.image_gpu={tagged}", other])


def test_make_images_tags_without_the_digest():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSEARCH_IMAGE")}
    env["PSEARCH_IMAGE_GPU"] = f"registry.example/psearch-cuda:v2@{DIGEST}"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.settings", "gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "registry.example/psearch-cuda:v2"


def test_parameters_mirror_params_yaml(compiled):
    spec, _ = compiled
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {"dataset_root", "params_json"}
    defaults = json.loads(inputs["params_json"]["defaultValue"])
    params = load_params(REPO / "params.yaml")
    assert defaults["train"]["lr"] == params.train.lr
    assert defaults["register"]["metric"] == params.register.metric
    assert "pipeline" not in defaults  # compile-time settings shape the DAG instead


def test_settings_change_the_dag(tmp_path, monkeypatch):
    monkeypatch.setenv("PSEARCH_IMAGE_GPU", "registry.example/psearch-cuda:test")
    monkeypatch.delenv("PSEARCH_IMAGE_CPU", raising=False)
    spec, platform = _compile(
        tmp_path,
        [
            "pipeline.extract_shards=2",
            "pipeline.image_cpu=registry.example/psearch:test",
            "pipeline.resources={train: {gpus: 2, memory_limit: 64Gi}}",
            "pipeline.gpu_node_selector={cloud.google.com/gke-accelerator: nvidia-l4}",
            "pipeline.secret=other-creds",
            "train.lr=0.05",
        ],
    )
    assert _executor(spec, "train")["image"] == "registry.example/psearch-cuda:test"
    assert _executor(spec, "ingest")["image"] == "registry.example/psearch:test"
    train = _executor(spec, "train")["resources"]
    assert train["accelerator"]["resourceCount"] == "2"
    assert train["resourceMemoryLimit"] == "64Gi"
    assert train["resourceCpuRequest"] == "8"  # untouched keys keep their defaults
    assert platform["exec-train"]["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"
    }
    assert platform["exec-train"]["secretAsEnv"][0]["secretName"] == "other-creds"
    loop = next(t for n, t in _stages_dag(spec).items() if n.startswith("for-loop"))
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1]
    defaults = json.loads(
        spec["root"]["inputDefinitions"]["parameters"]["params_json"]["defaultValue"]
    )
    assert defaults["train"]["lr"] == 0.05


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("pipeline.extract_shards=0", "pipeline.extract_shards: must be >= 1"),
        ("pipeline.resources={train: {cpu_limit: lots}}", "pipeline.resources.train.cpu_limit"),
        ("pipeline.resources={trian: {gpus: 1}}", "pipeline.resources.trian: unknown stage"),
        ("pipeline.imag_cpu=x", "unknown parameter pipeline.imag_cpu"),
        ("pipeline.dataset_pvc=Bad_Name", "pipeline.dataset_pvc"),
        ("pipeline.checkpoint_pvc=Bad_Name", "pipeline.checkpoint_pvc"),
        ("pipeline.image_gpu_digest=latest", "pipeline.image_gpu_digest: 'latest' is not a digest"),
        ("pipeline.image_pull_policy=Sometimes", "pipeline.image_pull_policy"),
        ("pipeline.shm_size=lots", "pipeline.shm_size: 'lots' is not a Kubernetes quantity"),
        ("pipeline.train_retries=-1", "pipeline.train_retries: must be >= 0"),
        ("pipeline.resources={train: {timeout_hours: -1}}", "timeout_hours: must be >= 0"),
        ("pipeline.checkpoint_mount=ckpt", "pipeline.checkpoint_mount: 'ckpt' must be absolute"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, override, fragment):
    out = tmp_path / "p.yaml"
    with pytest.raises(PsearchError, match=fragment):
        compile_pipeline(load_params(None, [override]), out)
    assert not out.exists()


def test_cli_compile_and_committed_yaml_is_current(tmp_path):
    """`python -m pipelines compile` (what `psearch pipeline compile` runs) works from the
    checkout, and pipelines/person_search.yaml (what users submit) matches the DAG, components
    and params.yaml."""
    out = tmp_path / "person_search.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSEARCH_IMAGE")}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    committed = REPO / "pipelines" / "person_search.yaml"
    assert committed.read_text() == out.read_text(), (
        "pipelines/person_search.yaml is stale: run `psearch pipeline compile`"
    )
