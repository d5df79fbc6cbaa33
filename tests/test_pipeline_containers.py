"""`psearch pipeline run-local --runner docker`: the whole DAG in the project's images.

Every task runs in the image `make images` built for it (CPU or CUDA), through
kfp.local.DockerRunner on Docker or on podman's Docker API, as the images'
non-root user, with the dataset bind-mounted read-only where the dataset PVC
would be and the MLflow store mounted as a volume. Needs a container engine and
the two images: without them the test skips and says why, unless
PSEARCH_CONTAINERS_TEST=require (CI, once it has built the images) makes that a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import docker
import pytest
from pipeline_quick import assert_index_and_metrics, quick_overrides

from pipelines import containers
from pipelines.local import run_local
from pipelines.settings import settings_for
from psearch.config import load_params
from psearch.errors import PsearchError

REPO = Path(__file__).resolve().parents[1]
QUICK = quick_overrides("pipeline-containers-test")
TASKS = ("dataset-digest", "ingest", "tracking", "pretrain", "train", "extract-merge",
         "evaluate", "index", "register", "promote", "close-runs")  # fmt: skip


def _missing_prerequisite(params, workdir: Path) -> str | None:
    """Why the DAG cannot run in containers here, or None: asked of the very Docker API
    (Docker, or podman's service) that run-local will use."""
    try:
        with containers.docker_endpoint(workdir) as url:
            client = docker.DockerClient(base_url=url)
            try:
                for kind in ("cpu", "gpu"):
                    image = settings_for(params).image(kind)
                    try:
                        client.images.get(image)
                    except docker.errors.ImageNotFound:
                        return f"no image {image} on {url} (run `make images`)"
            finally:
                client.close()
    except PsearchError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def container_run(tmp_path_factory):
    params = load_params(REPO / "params.yaml", QUICK)
    workdir = tmp_path_factory.mktemp("run-containers")
    missing = _missing_prerequisite(params, workdir)
    if missing:
        if os.environ.get("PSEARCH_CONTAINERS_TEST") == "require":
            pytest.fail(f"PSEARCH_CONTAINERS_TEST=require but {missing}")
        pytest.skip(missing)
    return params, run_local(params, workdir, runner="docker"), workdir


@pytest.mark.containers
def test_every_stage_runs_in_its_image_and_the_champion_is_registered(container_run):
    import mlflow

    params, result, workdir = container_run
    run_dir = Path(result["run_dir"])
    for task in TASKS:
        assert (run_dir / task / "executor_output.json").is_file(), task
    assert len(list(run_dir.glob("for-loop-*-iteration-*/extract"))) == 2
    digest = json.loads((run_dir / "dataset-digest" / "executor_output.json").read_text())
    assert digest["parameterValues"]["Output"].startswith("sha256:")

    # Written by the images' non-root user (uid 1000 when the caller is root).
    owners = {p.stat().st_uid for p in run_dir.rglob("executor_output.json")}
    assert owners == {1000 if os.getuid() == 0 else os.getuid()}
    # The dataset was mounted read-only where the PVC would be: the manifests point there.
    ingest = json.loads((run_dir / "ingest" / "executor_output.json").read_text())
    manifests = Path(ingest["artifacts"]["manifests"]["artifacts"][0]["uri"])
    dataset = json.loads((manifests / "dataset.json").read_text())
    assert dataset["root_abs"] == settings_for(params).dataset_mount
    metrics = assert_index_and_metrics(run_dir, result)
    evaluate = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    assert evaluate["parameterValues"]["Output"] == metrics["search"]["gallery_100"]["mAP"]
    register = json.loads((run_dir / "register" / "executor_output.json").read_text())
    assert register["parameterValues"]["Output"] == "1"

    # The MLflow store on the host volume holds one finished pipeline run and the champion.
    assert result["tracking_uri"] == f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name("pipeline-containers-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("psearch.stage") == "pipeline"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    # The image's git revision (baked in by `make images`) is on every run.
    assert {len(r.data.tags.get("psearch.git_revision", "")) for r in runs} == {40}
    champion = client.get_model_version_by_alias(params.register.model_name, "champion")
    assert str(champion.version) == "1"
    # Artifacts went to the mounted store, at the same path on the host.
    store = workdir / "mlflow"
    assert experiment.artifact_location == str(store / "mlruns" / experiment.experiment_id)
    assert (Path(experiment.artifact_location) / parents[0].info.run_id).is_dir()
