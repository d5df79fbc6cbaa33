"""The MLflow UI as a user sees it after the tiny pipeline, in a real browser (Playwright
driving Debian's chromium): `mlflow server` on 127.0.0.1 over the store that pretrain ->
train -> extract -> evaluate -> register -> promote filled.

Asserts the experiment's runs table (the "Model training" view, not GenAI's overview), a
dataset on every stage that read data, distinct run names, and the champion version's page
with its alias, description and signature. Saves docs/img/mlflow-runs.png,
mlflow-model-version.png and mlflow-model-schema.png when PSEARCH_SCREENSHOT=docs (else
under tmp_path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import BROWSER_MARKS, chromium_page, screenshot_dir
from servers import BIN, QUIET, free_port, server
from test_train import FAST

from psearch import stages
from psearch.config import load_params

pytestmark = [*BROWSER_MARKS, pytest.mark.slow]

mlflow = pytest.importorskip("mlflow")
# The link psearch's docs give: MLflow 3.17's UI opens an experiment in the mode of its own
# GenAI / Model training switch (GenAI unless switched), whatever the experiment's kind tag.
TRAINING_VIEW = "?workflowType=machine_learning"
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'


@pytest.fixture(scope="module")
def tiny_pipeline_store(tiny_manifests, tmp_path_factory):
    """(tracking URI, params): the tiny pipeline's stages, a few steps each, tracked."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    old = Path.cwd()
    os.chdir(root)  # MLflow's default artifact root is relative to the working directory
    try:
        params = load_params(
            None,
            [
                *FAST,
                "pretrain.max_steps=2",
                "train.max_steps=2",
                "extract.num_workers=0",
                # Small inputs and few proposals: the UI needs runs, not a good model.
                "model.min_size=96",
                "model.max_size=160",
                "model.rpn_post_nms_top_n_test=32",
                "model.detections_per_img=10",
                f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
            ],
        )
        stages.pretrain(tiny_manifests, root / "idnet", params)
        stages.train(tiny_manifests, root / "model", params, init=root / "idnet")
        stages.extract(tiny_manifests, str(root / "model" / "model.pt"), root / "dets", params)
        stages.evaluate(tiny_manifests, root / "dets", root / "eval", params.evaluate)
        stages.register(root / "model", root / "eval" / "metrics.json", params)
        stages.promote(params)
    finally:
        os.chdir(old)
    return params.tracking.tracking_uri, params, root


@pytest.fixture(scope="module")
def mlflow_ui(tiny_pipeline_store):
    uri, params, root = tiny_pipeline_store
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | QUIET
    cmd = [
        str(BIN / "mlflow"), "server", "--backend-store-uri", uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with server(cmd, port, env, root / "server.log"):
        yield f"http://127.0.0.1:{port}", uri, params


def test_runs_table_datasets_names_and_the_champion_page(mlflow_ui, tmp_path):
    base, uri, params = mlflow_ui
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    names = [run.info.run_name for run in runs]
    assert len(names) == 4 and len(set(names)) == len(names), names
    shots = screenshot_dir(tmp_path)
    with chromium_page(width=1440, height=640) as (page, errors):
        page.goto(f"{base}/#/experiments/{experiment.experiment_id}{TRAINING_VIEW}")
        page.wait_for_selector("text=Run Name")
        assert "/runs" in page.url  # the training-runs table, not the GenAI overview
        assert page.locator("text=Detect Issues").count() == 0
        for name in names:
            page.wait_for_selector(f"text={name}")
        # The stages that read manifests show the dataset and the split they read.
        datasets = page.locator("text=/CUHK-SYSU \\([0-9a-f]{12}\\)/")
        assert datasets.count() == 3  # pretrain, train, extract; register reads no data
        assert page.locator("text=Test").count() >= 1 and page.locator("text=Train").count() >= 2
        page.locator(ASSISTANT_CLOSE).click()
        page.screenshot(path=str(shots / "mlflow-runs.png"))

        version = client.get_model_version_by_alias(params.register.model_name, "champion")
        page.goto(
            f"{base}/#/models/{params.register.model_name}/versions/{version.version}"
            f"{TRAINING_VIEW}"
        )
        page.wait_for_selector("text=Schema")
        # The aliases render after the schema; waiting (not a bare count) keeps a loaded
        # machine from reading the page half drawn. A missing alias still fails here.
        page.wait_for_selector("text=@ champion", timeout=30_000)
        assert page.locator("text=@ champion").count() == 1
        assert page.locator("text=/^Trained on CUHK-SYSU/").count() == 1
        assert page.locator("text=/Search \\(gallery_100\\): mAP/").count() == 1
        if page.locator(ASSISTANT_CLOSE).count():
            page.locator(ASSISTANT_CLOSE).click()
        page.screenshot(path=str(shots / "mlflow-model-version.png"))
        # The signature: the pyfunc's table in (path + optional box) and out (+ features).
        page.locator("text=Inputs (5)").click()
        page.locator("text=Outputs (7)").click()
        page.wait_for_selector("text=Array(double)")
        assert page.locator("text=(optional)").count() == 4
        page.locator("text=Schema").evaluate("e => e.scrollIntoView({block: 'start'})")
        page.screenshot(path=str(shots / "mlflow-model-schema.png"))
        assert errors == []
    assert (shots / "mlflow-runs.png").stat().st_size > 10_000
