"""Joint detection + re-identification training (`psearch train`).

Two scene images per mini-batch train the proposal network, the person/background
classifier, the box regressor and the identity loss together. The paper found this
does not converge from a generic initialisation with sparse identity labels; start
from an IDNet (`--init`, see pretrain.py) and use the RSS loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from psearch.config import Params, TrainConfig, to_dict
from psearch.data.loaders import SceneDataset, list_collate
from psearch.data.manifest import Manifests
from psearch.digest import file_sha256
from psearch.errors import PsearchError
from psearch.models.idnet import IDNet, idnet_crop_size, transfer_idnet_weights
from psearch.models.io import model_from_checkpoint
from psearch.models.joint import JointNet, build_joint_net
from psearch.tensorfile import load_tensor_file
from psearch.train.anchor_check import manifest_coverage
from psearch.train.distill import TeacherForward
from psearch.train.pretrain import IDNET_FILE, was_skipped
from psearch.train.runner import TrainingStage

MODEL_FILE = "model.pt"
BN_BATCHES = 32  # batches of scenes that recompute BatchNorm statistics after training


def forward_scenes(model, batch, device: torch.device):
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {key: t[key].to(device) for key in ("boxes", "labels", "teacher") if key in t}
        for t in targets
    ]
    return model(images, targets), len(images)


def infer_scenes(model, batch, device: torch.device) -> None:
    """The inference pass (for BatchNorm recalibration), at min_size alone: the test views'
    extra passes would average their scales into the statistics, which scored lower
    (docs/demo-quality.md)."""
    views = {"test_scale_factors": model.test_scale_factors, "test_flip": model.test_flip}
    model.set_inference_settings(test_scale_factors=[], test_flip=False)
    try:
        model([image.to(device, non_blocking=True) for image in batch[0]])
    finally:
        model.set_inference_settings(**views)


class JointTraining(TrainingStage):
    """The joint net on scene images, from an IDNet's weights when `init` names one.

    `JointTraining(params, init).run(manifests, out)` writes `out/model.pt` and `out/run.json`;
    `init` is an idnet.pt file or the pretrain stage's output directory (a skipped stage's
    directory means: no IDNet, start from the backbone's weights).
    """

    name = "train"
    model_file = MODEL_FILE
    forward = staticmethod(forward_scenes)
    infer = staticmethod(infer_scenes)
    bn_batches = BN_BATCHES
    collate_fn = staticmethod(list_collate)
    cfg: TrainConfig

    def __init__(self, params: Params, init: Path | None = None) -> None:
        super().__init__(params)
        self.init = resolve_init(init) if init is not None else None
        self.skipped_init = init is not None and self.init is None
        self.transferred: list[str] = []  # the model's keys copied from the IDNet
        self.coverage: dict[str, Any] = {}  # anchor coverage of the training boxes
        self.dataset: SceneDataset | None = None  # build_dataset's; distillation reads it

    def build_dataset(self, tables: Manifests, num_classes: int) -> SceneDataset:
        self.dataset = SceneDataset(
            tables, num_classes, "train", hflip=self.cfg.hflip, seed=self.cfg.seed
        )
        return self.dataset

    def build_model(self, num_classes: int) -> JointNet:
        model = build_joint_net(
            num_classes, loss=to_dict(self.cfg.loss), **to_dict(self.params.model)
        )
        model.train_sizes = train_sizes(self.params.model.min_size, self.cfg.scale_factors)
        if self.init is not None:
            idnet = load_idnet_state(self.init)
            self.transferred = transfer_idnet_weights(model, idnet)
            # A detector-only net (the Deep baseline) has no re-id features to distil into.
            if self.cfg.distill_weight > 0 and self.cfg.loss.reid_loss != "none":
                model.distill_weight = self.cfg.distill_weight
                model.distill_iou = self.cfg.distill_iou
                self.forward = TeacherForward(
                    forward_scenes, records=self.dataset.records, **self.teacher(idnet)
                )
        elif self.cfg.loss.reid_loss != "oim" and not self.skipped_init:
            warnings.warn(
                "train: no --init given; the paper found joint training from a generic "
                "initialisation converges poorly with sparse identity labels (run pretrain first)",
                stacklevel=3,  # the caller of run()
            )
        return model

    def teacher(self, idnet: dict[str, Any]) -> dict[str, Any]:
        """The IDNet (its checkpoint, as read for the transfer) whose features the joint
        net's RoIs learn towards, frozen, and its crops' (height, width)."""
        teacher = model_from_checkpoint(idnet, source=str(self.init))
        if not isinstance(teacher, IDNet):
            raise PsearchError(f"{self.init}: not an IDNet (train.distill_weight needs one)")
        pretrain = self.params.pretrain
        size = idnet_crop_size(idnet.get("meta") or {}, (pretrain.crop_height, pretrain.crop_width))
        return {"teacher": teacher.requires_grad_(False).eval(), "crop_size": size}

    def startup_checks(self, tables: Manifests) -> list[str]:
        """How well the anchors fit the training boxes at the training resolution: persons
        no anchor reaches at IoU 0.7 are only learnt through their single best anchor."""
        m = self.params.model
        self.coverage = manifest_coverage(
            tables,
            "train",
            min_size=m.min_size,
            max_size=m.max_size,
            anchor_sizes=m.anchor_sizes,
            anchor_ratios=m.anchor_ratios,
        )
        c = self.coverage
        anchors = f"{_join(m.anchor_sizes)} px x ratios {_join(m.anchor_ratios)}"
        return [
            f"anchors {anchors} at {m.min_size}/{m.max_size}: best anchor IoU >= 0.5 for "
            f"{c['covered_iou_0.5']:.1%}, >= 0.7 for {c['covered_iou_0.7']:.1%} of "
            f"{c['boxes']} training boxes"
        ]

    def fingerprint_sections(self) -> dict[str, Any]:
        return {"model": to_dict(self.params.model), "train": to_dict(self.cfg)}

    def fingerprint_extra(self) -> str:
        return file_sha256(self.init) if self.init is not None else ""

    def run_info(self, dataset: SceneDataset, num_classes: int) -> dict[str, Any]:
        return {
            "train_images": len(dataset),
            "init": str(self.init) if self.init is not None else None,
            "init_transferred_keys": len(self.transferred),
            "anchor_coverage": self.coverage,
        }

    def log_to_run(self) -> None:
        import mlflow  # lazy: seconds to import; only a tracked run needs it

        mlflow.set_tag("psearch.init", str(self.init) if self.init is not None else "none")
        mlflow.log_param("init.transferred_keys", len(self.transferred))
        if self.coverage:
            mlflow.log_metrics(
                {
                    "anchor_coverage_iou_0.5": self.coverage["covered_iou_0.5"],
                    "anchor_coverage_iou_0.7": self.coverage["covered_iou_0.7"],
                }
            )
        if self.transferred:
            mlflow.log_text("\n".join(self.transferred) + "\n", "init/transferred_keys.txt")


def train_sizes(min_size: int, factors: list[float]) -> list[int]:
    """The shorter sides multi-scale training draws from: min_size times each factor."""
    return sorted({max(1, round(min_size * factor)) for factor in factors})


def _join(values) -> str:
    return "/".join(f"{v:g}" for v in values)


def resolve_init(init: Path) -> Path | None:
    """An idnet.pt file, or a directory holding one (the pretrain stage's output); None for
    the output of a skipped pretrain stage (the recipe has none)."""
    init = Path(init)
    if init.is_dir():
        if was_skipped(init):
            return None
        init = init / IDNET_FILE
    if not init.is_file():
        raise PsearchError(f"{init}: IDNet weights not found (--init takes idnet.pt or its dir)")
    return init


def load_idnet_state(path: Path) -> dict[str, Any]:
    return load_tensor_file(path, "IDNet file")
