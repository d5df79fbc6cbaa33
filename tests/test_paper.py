"""`psearch paper` on the tiny preset: every table and figure of the report is there (structure,
not values), the runs are MLflow children of one parent, and a re-run skips finished steps."""

from __future__ import annotations

import json
import time

import pytest

from psearch.cli import main as cli_main
from psearch.experiments import published
from psearch.experiments.cache import STEP_FILE, RunCache
from psearch.experiments.report import render, write_report

# A few optimiser steps at the tiny preset's resolution: the plumbing, not the accuracy.
TINY = [
    "model.min_size=120",
    "model.max_size=160",
    "model.rpn_pre_nms_top_n_train=300",
    "model.rpn_post_nms_top_n_train=64",
    "model.rpn_pre_nms_top_n_test=150",
    "model.rpn_post_nms_top_n_test=20",
    "model.roi_batch_size_per_image=32",
    "model.detections_per_img=3",
    "model.batch_norm=frozen",  # no BatchNorm recalibration after 3 steps
    "model.box_score_thresh=0.2",
    "model.feat_dim=32",
    "model.head_dim=64",
    "pretrain.crop_height=48",
    "pretrain.crop_width=24",
    "pretrain.batch_size=32",
    "pretrain.num_workers=0",
    "pretrain.warmup_iters=1",
    "pretrain.max_steps=3",
    "pretrain.log_every=1",
    "train.num_workers=0",
    "train.warmup_iters=1",
    "train.max_steps=3",
    "train.log_every=1",
    "train.loss.rss_k=8",
    "extract.num_workers=0",
    "extract.batch_size=8",
    "evaluate.plots=false",
    "evaluate.worst_queries=2",
]
STEP_NAMES = {
    "synth",
    "ingest",
    "pretrain",
    "train-rss",
    "train-softmax",
    "train-detector",
    "extract-rss-detect-joint",
    "extract-rss-gt-joint",
    "extract-detector-detect-idnet",
    "extract-detector-gt-idnet",
    "extract-softmax-detect-joint",
}


def _argv(out, tracking):
    sets = [*TINY, f"tracking.tracking_uri=sqlite:///{tracking}/mlflow.db"]
    # Fig. 6's second leg is the same code on another preset (test_report_... draws two).
    argv = ["paper", "--out", str(out), "--preset", "tiny", "--more-ids", "none"]
    for item in sets:
        argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    argv = _argv(tmp / "report", tmp)
    with pytest.MonkeyPatch.context() as patch:
        # No sampling threads beside twenty short stage runs.
        patch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        started = time.perf_counter()
        assert cli_main(argv) == 0
        print(f"\n[paper] tiny preset, 20 steps: {time.perf_counter() - started:.0f} s")
    return {"out": tmp / "report", "tmp": tmp, "argv": argv}


@pytest.mark.slow
def test_the_report_has_every_table_and_figure(paper):
    out = paper["out"]
    report = (out / "report.md").read_text()
    for heading in (
        "## Table 2: detector × re-id features (gallery_100",
        "## Table 3: occlusion and low-resolution subsets",
        "## Fig. 6: random sampling softmax (RSS) vs plain softmax",
        "## Fig. 7(b): search accuracy vs gallery size",
        "## The paper's orderings on our data",
        "## Steps",
    ):
        assert heading in report
    for png in ("fig6_rss_vs_softmax.png", "fig7b_gallery_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    # Table 2: every cell of ours is filled, the paper's numbers beside them.
    for row in ("Deep (separately trained detector)", "Joint net's own detections", "GT boxes"):
        line = next(line for line in report.splitlines() if line.startswith(f"| {row} |"))
        assert line.count(" / ") >= 2, line
    assert "52.6 / 59.0" in report and "55.7 / 62.7" in report and "66.5 / 71.1" in report
    assert "*(paper)*" in report
    # CBGM beside each Table 2 run; Table 3's three subsets; Fig. 7(b) at both tiny galleries.
    assert report.count("| with CBGM |") == 1 and "| Deep + IDNet (two-stage) |" in report
    for subset in ("| Whole test set |", "| Occlusion |", "| Low resolution |"):
        assert subset in report
    assert "| 50 |" in report and "| 100 |" in report
    # One line per ordering, each with a verdict.
    orderings = report.split("## The paper's orderings on our data")[1].split("## Steps")[0]
    verdicts = [line for line in orderings.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 4
    assert all(("**holds**" in v) or ("**does not hold**" in v) for v in verdicts), verdicts
    results = json.loads((out / "results.json").read_text())
    assert set(results["legs"]) == {"main"}  # --more-ids none
    main = results["legs"]["main"]
    assert main["train_identities"] == 15
    assert set(main["runs"]) == {
        "joint",
        "joint_gt",
        "deep_idnet",
        "gt_idnet",
        "softmax",
        "joint+cbgm",
        "joint_gt+cbgm",
        "deep_idnet+cbgm",
        "gt_idnet+cbgm",
    }
    # Fig. 6's curves come from each training's history.csv.
    assert len(main["trainings"]["rss"]["history"]) == 3
    assert {"loss_reid", "acc_reid"} <= set(main["trainings"]["softmax"]["history"][0])
    assert main["trainings"]["detector"]["run"]["final_loss_reid"] == 0.0
    assert {s["step"] for s in results["steps"]} >= STEP_NAMES


@pytest.mark.slow
def test_every_run_is_a_child_of_one_parent(paper):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{paper['tmp']}/mlflow.db")
    experiment = client.get_experiment_by_name("person-search")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("psearch.runner") == "paper"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    stages = [r.data.tags["psearch.stage"] for r in children]
    # One IDNet, three trainings, five extractions, 5 + 4 (CBGM) evaluations.
    assert sorted(set(stages)) == ["evaluate", "extract", "pretrain", "train"]
    assert (stages.count("pretrain"), stages.count("train")) == (1, 3)
    assert (stages.count("extract"), stages.count("evaluate")) == (5, 9)
    evaluation = next(r for r in children if r.data.tags["psearch.stage"] == "evaluate")
    assert "evaluate/search.gallery_100.mAP" in evaluation.data.metrics


@pytest.mark.slow
def test_a_rerun_skips_every_finished_step(paper):
    import mlflow

    out = paper["out"]
    records = {p: p.read_text() for p in (out / "steps").glob(f"*/{STEP_FILE}")}
    client = mlflow.MlflowClient(f"sqlite:///{paper['tmp']}/mlflow.db")
    experiment = client.get_experiment_by_name("person-search")
    before = len(client.search_runs([experiment.experiment_id]))
    assert cli_main(paper["argv"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] and all(step["cached"] for step in results["steps"])
    assert {p: p.read_text() for p in (out / "steps").glob(f"*/{STEP_FILE}")} == records
    assert len(client.search_runs([experiment.experiment_id])) == before  # the same parent
    assert "0 run this time" in (out / "report.md").read_text()


def test_a_step_with_other_params_or_inputs_is_run_again(tmp_path):
    cache = RunCache(tmp_path, log=lambda line: None)
    calls = []

    def work(directory):
        directory.mkdir(parents=True)
        calls.append(directory)

    first = cache.run("train", {"lr": 0.1}, ["data-a"], work)
    assert not first.cached and cache.run("train", {"lr": 0.1}, ["data-a"], work).cached
    assert not cache.run("train", {"lr": 0.2}, ["data-a"], work).cached
    assert not cache.run("train", {"lr": 0.1}, ["data-b"], work).cached
    assert len(calls) == 3 and len(set(calls)) == 3
    # A step that failed before step.json was written is not finished: it runs again.
    (first.directory / STEP_FILE).unlink()
    assert not cache.run("train", {"lr": 0.1}, ["data-a"], lambda d: None).cached


def test_the_orderings_are_judged_from_the_numbers(tmp_path):
    def run(m, **subsets):
        search = {"gallery_50": {"mAP": m + 0.05, "top1": m, "queries": 10}}
        search["gallery_100"] = {"mAP": m, "top1": m, "queries": 10}
        search.update({k: {"mAP": v, "top1": v, "queries": 2} for k, v in subsets.items()})
        return {"metrics": {"search": search, "detection": {"ap": 0.5, "recall": 0.6}}}

    def training(loss):
        history = [{"step": 1.0, "loss_reid": loss + 1, "acc_reid": 0.1}]
        history += [{"step": 2.0, "loss_reid": loss, "acc_reid": 0.5}]
        run = {"final_loss_reid": loss, "final_acc_reid": 0.5, "steps": 2}
        return {"run": run, "history": history}

    runs = {
        "joint": run(0.5, occlusion=0.3, low_resolution=0.6),
        "joint_gt": run(0.7),
        "deep_idnet": run(0.4),
        "gt_idnet": run(0.6),
        "softmax": run(0.45),
        "joint+cbgm": run(0.3),
    }
    leg = {
        "dataset": "synthetic preset x",
        "train_identities": 10,
        "runs": runs,
        "trainings": {"rss": training(1.0), "softmax": training(2.0)},
    }
    more = {
        **leg,
        "dataset": "synthetic preset y",
        "train_identities": 3000,
        "runs": {"joint": run(0.3), "softmax": run(0.2)},
    }
    results = {"legs": {"main": leg, "more_ids": more}, "steps": [], "mlflow_parent_run": None}
    report = write_report(results, tmp_path).read_text()
    assert report == render(results)
    assert (tmp_path / "fig6_rss_vs_softmax.png").stat().st_size > 0
    assert "| 3000 | synthetic preset y | rss |" in report
    lines = {line.split(":")[0]: line for line in report.splitlines() if line.startswith("- ")}
    assert "**holds**" in lines["- GT boxes ≥ joint ≥ two-stage (mAP, gallery_100)"]
    rss = next(v for k, v in lines.items() if k.startswith("- RSS"))
    assert "**holds**" in rss and "at 3000 identities" in rss
    assert "**holds**" in lines["- mAP falls as the gallery grows (joint net)"]
    # Low resolution above the whole set: the paper's claim fails on these numbers.
    assert "**does not hold**" in next(v for k, v in lines.items() if k.startswith("- Occlusion"))
    assert published.TABLE2[("Deep", "IDNet")] == (52.6, 59.0)
    # CBGM's table, and why synthetic data cannot show its gain (no companions reappear).
    assert "| Joint net (ours, end-to-end) | 50.0 / 50.0 | 30.0 / 30.0 | -20.0 |" in report
    assert "companions never reappear" in report
    leg["dataset"] = "manifests data/manifests"
    assert "94.8" in render(results) and "companions never reappear" not in render(results)


def test_paper_refuses_a_recipe_without_pretraining(tmp_path, capsys):
    code = cli_main(
        ["paper", "--out", str(tmp_path / "r"), "--set", "pretrain.enabled=false"]
        + ["--set", "tracking.enabled=false"]
    )
    assert code == 2 and "pretrain.enabled is false" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
