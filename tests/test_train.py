"""pretrain + train on the tiny preset: outputs, MLflow run, init transfer, exact resume, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings

import pytest
import torch

from psearch.cli import main as cli_main
from psearch.config import load_params
from psearch.digest import file_sha256
from psearch.errors import PsearchError
from psearch.models.io import load_model
from psearch.tracking import MODEL_SHA256_TAG
from psearch.train.checkpoint import checkpoint_dir, latest_checkpoint
from psearch.train.engine import lr_factor
from psearch.train.runner import RUN_FACTS

# Small and fast: the tiny preset's own resolution, few RoIs, small crops.
FAST = [
    "model.min_size=150",
    "model.max_size=200",
    "model.rpn_pre_nms_top_n_train=300",
    "model.rpn_post_nms_top_n_train=64",
    "model.rpn_pre_nms_top_n_test=200",
    "model.rpn_post_nms_top_n_test=50",
    "model.roi_batch_size_per_image=64",
    "model.feat_dim=64",
    "model.head_dim=128",
    "pretrain.crop_height=64",
    "pretrain.crop_width=32",
    "pretrain.batch_size=32",
    "pretrain.num_workers=0",
    "pretrain.warmup_iters=2",
    "train.num_workers=0",
    "train.warmup_iters=5",
    "train.loss.rss_k=8",
]


def fast_params(*extra: str, tracking_dir=None):
    overrides = list(FAST) + list(extra)
    if tracking_dir is None:
        overrides.append("tracking.enabled=false")
    else:
        overrides.append(f"tracking.tracking_uri=sqlite:///{tracking_dir}/mlflow.db")
    return load_params(None, overrides)


def test_lr_schedule_warms_up_then_steps_down():
    assert lr_factor(0, 10, []) == pytest.approx(0.1)
    assert lr_factor(5, 10, []) == pytest.approx(0.55)
    assert lr_factor(10, 10, []) == 1.0
    assert lr_factor(99, 10, [100]) == 1.0
    assert lr_factor(100, 10, [100]) == pytest.approx(0.1)
    assert lr_factor(3, 0, []) == 1.0
    # Several drops multiply: the papers' "x0.1 at 40k, again at 45k" schedules.
    assert lr_factor(149, 0, [100, 150]) == pytest.approx(0.1)
    assert lr_factor(150, 0, [100, 150]) == pytest.approx(0.01)


# ---------------------------------------------------------------------------- one tracked run


@pytest.fixture(scope="module")
def trained(tiny_manifests, tmp_path_factory):
    """pretrain then train (from the IDNet) on tiny, tracked in a temporary SQLite store."""
    from psearch import stages

    tmp = tmp_path_factory.mktemp("trained")
    params = fast_params(
        "pretrain.epochs=4",
        "pretrain.log_every=2",
        "train.epochs=1",
        "train.log_every=2",
        "train.max_steps=12",
        tracking_dir=tmp,
    )
    pre = stages.pretrain(tiny_manifests, tmp / "pretrain", params)
    joint = stages.train(tiny_manifests, tmp / "train", params, init=tmp / "pretrain")
    return {"tmp": tmp, "params": params, "pretrain": pre, "train": joint}


def _client(trained):
    import mlflow

    return mlflow.MlflowClient(trained["params"].tracking.tracking_uri)


@pytest.mark.slow
def test_outputs_and_run_json(trained):
    tmp = trained["tmp"]
    files = ["history.csv", "run.json"]
    assert sorted(p.name for p in (tmp / "pretrain").iterdir()) == sorted(["idnet.pt", *files])
    assert sorted(p.name for p in (tmp / "train").iterdir()) == sorted(["model.pt", *files])
    with open(tmp / "train" / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    # train.log_every=2 over 12 steps: one row per window, the losses the MLflow run has too.
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "loss_reid", "acc_reid", "lr"} <= set(rows[0])
    info = json.loads((tmp / "train" / "run.json").read_text())
    # The execution's facts are returned (and in MLflow), never in run.json: a DVC output
    # must hash alike on every run.
    returned = trained["train"]
    assert returned["model_uri"] == f"runs:/{returned['run_id']}/model"
    assert returned["logged_model_uri"].startswith("models:/m-")
    assert not set(RUN_FACTS) & set(info) and set(RUN_FACTS) <= set(returned)
    tags = _client(trained).get_run(returned["run_id"]).data.tags
    assert tags[MODEL_SHA256_TAG] == file_sha256(tmp / "train" / "model.pt")
    assert tags["psearch.logged_model_uri"] == returned["logged_model_uri"]
    assert info["num_classes"] == 15 and info["steps"] == 12
    assert info["init_transferred_keys"] > 0
    for key in ("final_loss", "final_loss_det", "final_loss_reid", "final_loss_rpn_cls"):
        assert key in info
    pre = json.loads((tmp / "pretrain" / "run.json").read_text())
    assert pre["background_crops"] == pre["labelled_crops"] > 0
    # The IDNet keeps the crop geometry it was trained with, for extraction and the pyfunc.
    from psearch.models.io import load_model

    idnet, meta = load_model(tmp / "pretrain" / "idnet.pt")
    pretrain_cfg = trained["params"].pretrain
    assert idnet.context == pretrain_cfg.crop_context == 1.5
    assert (meta["crop_height"], meta["crop_width"]) == (
        pretrain_cfg.crop_height,
        pretrain_cfg.crop_width,
    )


def test_pretrain_refuses_a_crop_context_below_one(tiny_manifests, tmp_path):
    from psearch import stages

    with pytest.raises(PsearchError, match="pretrain.crop_context: 0.9 is below 1"):
        stages.pretrain(
            tiny_manifests, tmp_path / "idnet", fast_params("pretrain.crop_context=0.9")
        )
    assert not (tmp_path / "idnet").exists()


@pytest.mark.slow
def test_losses_go_down(trained):
    client = _client(trained)
    for stage in ("pretrain", "train"):
        history = client.get_metric_history(trained[stage]["run_id"], f"{stage}/loss")
        values = [m.value for m in sorted(history, key=lambda m: m.step)]
        assert len(values) >= 4
        assert values[-1] < values[0], (stage, values)
    pre = trained["pretrain"]
    assert pre["final_acc_reid"] > 0.3  # crops are learnable within a few epochs


@pytest.mark.slow
def test_mlflow_run_holds_params_metrics_tags_and_model(trained):
    from psearch.inference.loading import fetch_model

    client = _client(trained)
    run = client.get_run(trained["train"]["run_id"])
    assert run.data.params["train.lr"] == str(trained["params"].train.lr)
    assert run.data.params["model.backbone"] == "small"
    assert (
        int(run.data.params["init.transferred_keys"]) == trained["train"]["init_transferred_keys"]
    )
    tags = run.data.tags
    assert tags["psearch.stage"] == "train" and tags["psearch.seed"] == "0"
    assert tags["psearch.data_version"] not in ("", "unknown")
    assert "psearch.git_revision" in tags and "psearch.version.torch" in tags
    for key in ("loss", "loss_det", "loss_reid", "acc_det", "lr", "images_per_s", "final_loss"):
        assert f"train/{key}" in run.data.metrics, key  # namespaced: pretrain logs acc_reid too
    assert run.info.run_name.startswith("train · rss · small · ")
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest in tags["psearch.data_version"]
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["train"]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")]
    assert lrs == sorted(lrs)  # warm-up: the learning rate only rises
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "init" in artifacts
    model, meta = fetch_model(trained["train"]["model_uri"])
    assert meta["stage"] == "train" and model.num_classes == 15
    assert (
        _client(trained).get_run(trained["pretrain"]["run_id"]).data.tags["psearch.stage"]
        == "pretrain"
    )


# ---------------------------------------------------------------------------- resume


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def killed_after(monkeypatch, stage: str, steps: int):
    """Make `stage`'s training pass raise KeyboardInterrupt (a kill) in step `steps + 1`;
    returns what undoes it. A finished training discards its checkpoints, so a kill is how
    a test gets a run to resume."""
    from psearch.train.joint import JointTraining
    from psearch.train.pretrain import Pretraining

    cls = Pretraining if stage == "pretrain" else JointTraining
    real, calls = cls.forward, {"n": 0}

    def dies(model, batch, device):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return real(model, batch, device)

    monkeypatch.setattr(cls, "forward", staticmethod(dies))
    return lambda: monkeypatch.setattr(cls, "forward", staticmethod(real))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "train"])
def test_resume_ends_with_the_same_weights(tiny_manifests, tmp_path, stage, monkeypatch):
    """N steps straight == N/2 steps, a stop, then --resume to N (exact, on CPU)."""
    from psearch import stages

    run = getattr(stages, stage)
    name = "idnet.pt" if stage == "pretrain" else "model.pt"

    def params(max_steps):
        return fast_params(
            f"{stage}.max_steps={max_steps}",
            f"{stage}.checkpoint_every=3",
            f"{stage}.log_every=3",
            f"{stage}.epochs=3",
            "model.min_size=96",  # exactness does not need the full resolution
            "model.max_size=128",
            "pretrain.batch_size=16",
        )

    run(tiny_manifests, tmp_path / "straight", params(6))
    revive = killed_after(monkeypatch, stage, 4)  # killed in step 5: the checkpoint of step 3
    with pytest.raises(KeyboardInterrupt):
        run(tiny_manifests, tmp_path / "resumed", params(6))
    revive()
    again = run(tiny_manifests, tmp_path / "resumed", params(6), resume=True)
    assert again["resumed_from_step"] == 3 and again["steps"] == 6
    assert not checkpoint_dir(tmp_path / "resumed").exists(), "a finished run keeps none"
    a, b = _state(tmp_path / "straight" / name), _state(tmp_path / "resumed" / name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The log windows before the stop come back from the checkpoint: the same curves.
    straight, resumed = (
        (tmp_path / d / "history.csv").read_text() for d in ("straight", "resumed")
    )
    assert straight == resumed and len(straight.splitlines()) == 3  # header, steps 3 and 6


@pytest.mark.slow
def test_resume_with_changed_settings_starts_fresh(tiny_manifests, tmp_path, monkeypatch):
    from psearch import stages

    out = tmp_path / "idnet"
    revive = killed_after(monkeypatch, "pretrain", 2)
    with pytest.raises(KeyboardInterrupt):
        stages.pretrain(
            tiny_manifests, out, fast_params("pretrain.max_steps=3", "pretrain.checkpoint_every=2")
        )
    revive()
    assert latest_checkpoint(checkpoint_dir(out)).name == "step-00000002.pt"
    changed = fast_params("pretrain.max_steps=2", "pretrain.checkpoint_every=2", "pretrain.lr=0.02")
    with pytest.warns(UserWarning, match="other settings"):
        info = stages.pretrain(tiny_manifests, out, changed, resume=True)
    assert info["resumed_from_step"] == 0


def test_a_checkpoint_of_other_training_code_is_not_resumed(tiny_manifests, tmp_path, monkeypatch):
    # Same settings and data, other code (an upgrade between a kill and --resume): resuming
    # could not end where an uninterrupted run of this code ends, so it starts fresh.
    from psearch import stages
    from psearch.train import checkpoint

    out, params = (
        tmp_path / "idnet",
        fast_params("pretrain.max_steps=3", "pretrain.checkpoint_every=2"),
    )
    revive = killed_after(monkeypatch, "pretrain", 2)
    with pytest.raises(KeyboardInterrupt):
        stages.pretrain(tiny_manifests, out, params)
    revive()
    assert latest_checkpoint(checkpoint_dir(out)).name == "step-00000002.pt"
    monkeypatch.setattr(checkpoint, "code_version", lambda: "another-version")
    with pytest.warns(UserWarning, match="other settings"):
        info = stages.pretrain(tiny_manifests, out, params, resume=True)
    assert info["resumed_from_step"] == 0


@pytest.mark.slow
def test_a_failed_run_leaves_no_output_but_its_checkpoint(tiny_manifests, tmp_path, monkeypatch):
    from psearch import stages
    from psearch.train import joint

    calls = {"n": 0}
    real = joint.forward_scenes

    def dies_at_step_three(model, batch, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, batch, device)

    monkeypatch.setattr(joint.JointTraining, "forward", staticmethod(dies_at_step_three))
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        stages.train(
            tiny_manifests, out, fast_params("train.checkpoint_every=1", "train.max_steps=5")
        )
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".model")] == []
    assert latest_checkpoint(checkpoint_dir(out)).name == "step-00000002.pt"


# ---------------------------------------------------------------------------- errors and CLI


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_manifests, capsys):
    code = cli_main(
        ["train", "--manifests", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and len(err.splitlines()) == 1
    code = cli_main(
        [
            "train",
            "--manifests",
            str(tiny_manifests),
            "--out",
            str(tmp_path / "o"),
            "--init",
            str(tmp_path / "missing.pt"),
            "--set",
            "tracking.enabled=false",
        ]
    )
    assert code == 2 and "missing.pt" in capsys.readouterr().err
    code = cli_main(
        [
            "pretrain",
            "--manifests",
            str(tiny_manifests),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "pretrain.epoch=3",
        ]
    )
    assert code == 2 and "pretrain.epoch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_init_from_a_foreign_file_is_refused(tiny_manifests, tmp_path):
    from psearch.train.joint import load_idnet_state

    junk = tmp_path / "idnet.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(PsearchError, match="idnet.pt: not a readable IDNet file"):
        load_idnet_state(junk)


def test_help_lists_the_options():
    out = subprocess.run(
        [sys.executable, "-m", "psearch", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for option in ("--manifests", "--out", "--init", "--resume", "--params", "--set"):
        assert option in out.stdout


# ---------------------------------------------------------------------------- overfitting


def _subset_manifests(manifests, out, n_images):
    """The manifests restricted to the first `n_images` training images (same image files)."""
    import pyarrow.compute as pc

    from psearch.data.loaders import dataset_root
    from psearch.data.manifest import read_manifests, write_parquet

    tables = read_manifests(manifests)
    train = tables.images.filter(pc.equal(tables.images["split"], "train"))
    keep = train["image_id"].slice(0, n_images)
    out.mkdir()
    write_parquet(
        tables.images.filter(pc.is_in(tables.images["image_id"], keep)), out / "images.parquet"
    )
    write_parquet(
        tables.boxes.filter(pc.is_in(tables.boxes["image_id"], keep)), out / "boxes.parquet"
    )
    for name in ("persons", "queries", "galleries"):
        write_parquet(getattr(tables, name), out / f"{name}.parquet")
    info = {**tables.info, "root": str(dataset_root(tables))}
    (out / "dataset.json").write_text(json.dumps(info))
    return out


@pytest.mark.slow
def test_a_few_images_can_be_overfitted_to_high_detection_recall(tiny_manifests, tmp_path):
    from torchvision.ops import box_iou

    from psearch import stages
    from psearch.data.loaders import SceneDataset
    from psearch.data.manifest import read_manifests
    from psearch.models.io import load_model

    subset = _subset_manifests(tiny_manifests, tmp_path / "subset", 2)
    params = fast_params(
        "train.max_steps=80",
        "train.epochs=1000",
        "train.lr=0.01",
        "train.hflip=0",
        "train.warmup_iters=10",
    )
    info = stages.train(subset, tmp_path / "model", params)
    model, _ = load_model(tmp_path / "model")
    found = total = 0
    with torch.no_grad():
        for image, target in SceneDataset(read_manifests(subset), info["num_classes"], hflip=0):
            detections = model([image])[0]
            boxes = detections["boxes"][detections["scores"] >= 0.5]
            total += len(target["boxes"])
            if len(boxes):
                found += int((box_iou(target["boxes"], boxes).max(1).values >= 0.5).sum())
    # Measured: 9 of 13 after 80 iterations from scratch (BatchNorm recalibrated at the end).
    assert found / total >= 0.6, (found, total, info)


def test_a_recipe_without_pretraining_skips_it_and_trains_from_the_backbone(
    tiny_manifests, tmp_path
):
    # The DVC stages' path for oim-resnet50: pretrain writes a marker, train --init DIR
    # starts without an IDNet, and without the RSS "run pretrain first" warning: the recipe
    # asked for no IDNet.
    from psearch import stages

    params = fast_params("pretrain.enabled=false", "train.max_steps=2")
    info = stages.pretrain(tiny_manifests, tmp_path / "idnet", params)
    assert info["skipped"] is True
    assert sorted(p.name for p in (tmp_path / "idnet").iterdir()) == ["run.json"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stages.train(tiny_manifests, tmp_path / "model", params, init=tmp_path / "idnet")
    assert not [w for w in caught if "--init" in str(w.message)]
    assert out["init"] is None and out["steps"] == 2
    assert (tmp_path / "model" / "model.pt").is_file()


def test_batch_norm_statistics_are_recomputed_after_training(tiny_manifests, tmp_path):
    """Precise BN: running stats become the exact average over the recalibration batches,
    not MobileNetV3's momentum-0.01 trace of one step (which would still be ~the init)."""
    from psearch import stages
    from psearch.train.pretrain import BN_BATCHES

    info = stages.pretrain(tiny_manifests, tmp_path / "idnet", fast_params("pretrain.max_steps=1"))
    state = _state(tmp_path / "idnet" / "idnet.pt")
    batches = min(BN_BATCHES, info["crops"] // 32)
    tracked = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == batches for v in tracked)
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert max(float(m.abs().max()) for m in means) > 0.05  # far from the zero init


@pytest.mark.filterwarnings("ignore:train. no --init given")
def test_joint_batch_norm_statistics_come_from_one_view_per_scene(tiny_manifests, tmp_path):
    """The test views (several scales, mirrored) are for features only: recalibration runs
    each batch once, at min_size, and leaves the views as the params set them."""
    from psearch import stages
    from psearch.train.joint import BN_BATCHES

    params = fast_params("train.max_steps=1", "model.test_flip=true")
    assert params.model.test_scale_factors == [0.89, 1.0, 1.11]
    info = stages.train(tiny_manifests, tmp_path / "model", params)
    state = _state(tmp_path / "model" / "model.pt")
    batches = min(BN_BATCHES, info["train_images"] // params.train.batch_size)
    tracked = {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert tracked == {batches}, (tracked, batches)
    model, _ = load_model(tmp_path / "model" / "model.pt")
    assert model.test_scale_factors == [0.89, 1.0, 1.11] and model.test_flip is True


@pytest.mark.parametrize(("factors", "sizes"), [("[0.5,1.0,1.25,0.5]", (75, 150, 188)), ("[]", ())])
@pytest.mark.filterwarnings("ignore:train. no --init given")
def test_joint_training_draws_its_scales_from_scale_factors(factors, sizes):
    from psearch.train.joint import JointTraining

    params = fast_params(f"train.scale_factors={factors}")  # model.min_size=150
    assert JointTraining(params).build_model(5).train_sizes == sizes


def test_a_scale_factor_must_be_positive():
    with pytest.raises(PsearchError, match=r"train.scale_factors: every entry must be greater"):
        fast_params("train.scale_factors=[1.0,0]")


@pytest.mark.slow
def test_distillation_trains_towards_the_idnet_features(trained, tiny_manifests, tmp_path):
    from psearch import stages

    idnet = trained["tmp"] / "pretrain"
    params = fast_params("train.distill_weight=3", "train.max_steps=4", "train.log_every=1")
    stages.train(tiny_manifests, tmp_path / "train", params, init=idnet)
    with open(tmp_path / "train" / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    # 3 x (1 - cosine): the RoIs start from IDNet's own weights, so near but not at IDNet.
    distill = [float(row["loss_distill"]) for row in rows]
    assert len(distill) == 4 and all(0.0 < value < 3.0 for value in distill)
    detector = stages.train(
        tiny_manifests,
        tmp_path / "detector",
        fast_params("train.distill_weight=3", "train.max_steps=2", "train.loss.reid_loss=none"),
        init=idnet,
    )
    assert "final_loss_distill" not in detector  # the Deep baseline stays a pure detector


@pytest.mark.slow
def test_distillation_targets_hold_for_flipped_scenes(trained, tiny_manifests, tmp_path):
    import dataclasses

    from torchvision.io import write_png

    from psearch.data.loaders import SceneDataset, num_train_identities, read_image
    from psearch.data.manifest import read_manifests
    from psearch.imaging import hflip_boxes
    from psearch.models.io import load_model
    from psearch.train.distill import teacher_features

    idnet, _ = load_model(trained["tmp"] / "pretrain")
    manifests = read_manifests(tiny_manifests)
    record = max(
        SceneDataset(manifests, num_train_identities(manifests)).records, key=lambda r: len(r.boxes)
    )
    flipped_path = tmp_path / "flipped.png"
    image = read_image(record.path)
    write_png(image.flip(-1), str(flipped_path))
    flipped = dataclasses.replace(
        record,
        image_id=-1,
        path=flipped_path,
        boxes=hflip_boxes(torch.from_numpy(record.boxes), image.shape[-1]).numpy(),
    )
    table = teacher_features(idnet, [record, flipped], (64, 32), torch.device("cpu"))
    assert len(table[record.image_id]) == len(record.boxes) >= 2
    torch.testing.assert_close(table[-1], table[record.image_id], atol=2e-3, rtol=0)
    norms = table[record.image_id].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    cosines = table[record.image_id] @ table[record.image_id].T
    assert cosines.fill_diagonal_(0).max() < 0.99  # distinct people, distinct targets


def test_detector_only_training_has_no_identity_loss(tiny_manifests, tmp_path):
    """train.loss.reid_loss none: the paper's separately trained "Deep" detector. Its
    identity loss is zero, and extraction refuses its (untrained) re-id features."""
    from psearch import stages

    params = fast_params(
        "train.loss.reid_loss=none", "train.max_steps=4", "train.log_every=2", "train.epochs=1"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no --init: the generic-initialisation warning
        info = stages.train(tiny_manifests, tmp_path / "det", params)
    assert info["final_loss_reid"] == 0.0 and info["final_loss_det"] > 0.0
    model = torch.load(tmp_path / "det" / "model.pt", weights_only=False)
    assert model["loss_config"]["reid_loss"] == "none"
    with pytest.raises(PsearchError, match="detector-only model has no re-id features"):
        stages.extract(tiny_manifests, str(tmp_path / "det"), tmp_path / "dets", params)
    with pytest.raises(PsearchError, match="nothing to learn"):
        stages.pretrain(tiny_manifests, tmp_path / "idnet", params)
