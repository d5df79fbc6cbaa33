"""IDNet pretraining (`psearch pretrain`): classify cropped persons and background boxes.

The paper's remedy for sparse identity labels: with 256 crops of many identities in
each mini-batch the C + 1 classifier receives useful gradients, which two scene
images per batch cannot give; the resulting weights initialise the joint net.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from psearch.atomic import atomic_dir
from psearch.config import LossConfig, Params, PretrainConfig, to_dict
from psearch.data.loaders import CropDataset
from psearch.data.manifest import Manifests
from psearch.errors import PsearchError
from psearch.models.idnet import IDNet, build_idnet
from psearch.train.runner import RUN_FILE, TrainingStage

IDNET_FILE = "idnet.pt"
BN_BATCHES = 8  # batches of crops that recompute BatchNorm statistics after training


def forward_crops(model, batch, device: torch.device):
    crops, labels = batch
    crops = crops.to(device, non_blocking=True)
    return model(crops, labels.to(device, non_blocking=True)), len(crops)


def infer_crops(model, batch, device: torch.device) -> None:
    """The inference pass (for BatchNorm recalibration)."""
    model.features(batch[0].to(device, non_blocking=True))


class Pretraining(TrainingStage):
    """IDNet on every labelled training box and about as many random background boxes.

    `Pretraining(params).run(manifests, out)` writes `out/idnet.pt` and `out/run.json`.
    """

    name = "pretrain"
    model_file = IDNET_FILE
    forward = staticmethod(forward_crops)
    infer = staticmethod(infer_crops)
    bn_batches = BN_BATCHES
    cfg: PretrainConfig

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        if self.cfg.crop_context < 1.0:
            raise PsearchError(
                f"pretrain.crop_context: {self.cfg.crop_context} is below 1 (the whole box)"
            )

    def build_dataset(self, tables: Manifests, num_classes: int) -> CropDataset:
        cfg = self.cfg
        return CropDataset(
            tables,
            num_classes,
            cfg.crop_height,
            cfg.crop_width,
            cfg.background_ratio,
            hflip=cfg.hflip,
            seed=cfg.seed,
            context=cfg.crop_context,
            erase=cfg.erase,
        )

    @property
    def loss(self) -> LossConfig:
        """IDNet's identity loss: pretrain.loss, else the joint net's train.loss."""
        loss = self.cfg.loss if self.cfg.loss is not None else self.params.train.loss
        if loss.reid_loss == "none":
            # An IDNet is an identity classifier: without its loss it learns nothing.
            source = (
                "pretrain.loss" if self.cfg.loss is not None else "train.loss (pretrain.loss null)"
            )
            raise PsearchError(f"{source}.reid_loss: none leaves IDNet nothing to learn")
        return loss

    def build_model(self, num_classes: int) -> IDNet:
        return build_idnet(
            num_classes,
            context=self.cfg.crop_context,
            loss=to_dict(self.loss),
            **to_dict(self.params.model),
        )

    def fingerprint_sections(self) -> dict[str, Any]:
        return {
            "model": to_dict(self.params.model),
            "pretrain": to_dict(self.cfg),
            "loss": to_dict(self.loss),
        }

    def model_meta(self) -> dict[str, Any]:
        # The crop geometry: extraction and the pyfunc cut crops as training did.
        return {
            "crop_height": self.cfg.crop_height,
            "crop_width": self.cfg.crop_width,
            "loss": to_dict(self.loss),
        }

    def run_info(self, dataset: CropDataset, num_classes: int) -> dict[str, Any]:
        labelled = int((dataset.labels < num_classes).sum())
        return {
            "crops": len(dataset),
            "labelled_crops": labelled,
            "background_crops": len(dataset) - labelled,
        }


def write_skipped(out: Path) -> dict[str, Any]:
    """The output of a pretrain stage the recipe does without (pretrain.enabled false): no
    model, a run.json that says so, so DVC's stage still has its output and `psearch train
    --init OUT` knows to start from the backbone's own weights."""
    info = {
        "skipped": True,
        "reason": "pretrain.enabled is false: this recipe has no IDNet stage",
    }
    with atomic_dir(Path(out)) as tmp:
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def was_skipped(out: Path) -> bool:
    """Whether `out` is the output of a skipped pretrain stage (write_skipped)."""
    run = Path(out) / RUN_FILE
    if not run.is_file() or (Path(out) / IDNET_FILE).exists():
        return False
    try:
        return bool(json.loads(run.read_text()).get("skipped"))
    except (ValueError, AttributeError):
        return False
