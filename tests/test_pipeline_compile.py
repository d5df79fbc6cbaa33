"""The compiled Kubeflow pipeline (KFP IR): stages, edges, fan-out, condition, cluster settings."""

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

    assert deps("ingest") == set()
    assert deps("pretrain") == {"ingest", "tracking"}
    assert deps("train") == {"ingest", "pretrain", "tracking"}
    loop = next(name for name in root if name.startswith("for-loop"))
    assert deps(loop) == {"ingest", "train"}
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
        if stage in {"ingest", "pretrain", "train", "extract"}:
            assert mounts == [
                {
                    "constant": "psearch-dataset",
                    "mountPath": "/mnt/dataset",
                    "pvcNameParameter": {"runtimeValue": {"constant": "psearch-dataset"}},
                }
            ]
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
    for stage in ("tracking", "pretrain", "train", "register", "promote", "close-runs"):
        assert not cached(stage), stage
    retry = tasks["extract"]["retryPolicy"]
    assert retry["maxRetryCount"] == 2 and retry["backoffDuration"] == "60s"
    assert all("retryPolicy" not in t for name, t in tasks.items() if name != "extract")


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
