"""IDNet pretraining (`psearch pretrain`): classify cropped persons and background boxes.

The paper's remedy for sparse identity labels: with 256 crops of many identities in
each mini-batch the C + 1 classifier receives useful gradients, which two scene
images per batch cannot give; the resulting weights initialise the joint net.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from psearch.config import Params, to_dict
from psearch.data.loaders import CropDataset, num_train_identities
from psearch.data.manifest import read_manifests
from psearch.errors import PsearchError
from psearch.tracking import data_version
from psearch.train import checkpoint as ckpt
from psearch.train.distributed import barrier, cleanup, dist_context
from psearch.train.engine import Engine, seed_everything
from psearch.train.runner import metrics_logger, model_meta, summary, tracked_run, write_output

log = logging.getLogger(__name__)
BN_BATCHES = 8  # batches of crops that recompute BatchNorm statistics after training


def forward_crops(model, batch, device: torch.device):
    crops, labels = batch
    crops = crops.to(device, non_blocking=True)
    return model(crops, labels.to(device, non_blocking=True)), len(crops)


def infer_crops(model, batch, device: torch.device) -> None:
    """The inference pass (for BatchNorm recalibration)."""
    model.features(batch[0].to(device, non_blocking=True))


def pretrain(manifests: Path, out: Path, params: Params, resume: bool = False) -> dict[str, Any]:
    """Train IDNet on the training crops; write `out/idnet.pt` and `out/run.json`."""
    from psearch.models.idnet import build_idnet

    cfg = params.pretrain
    if cfg.crop_context < 1.0:
        raise PsearchError(f"pretrain.crop_context: {cfg.crop_context} is below 1 (the whole box)")
    ctx = dist_context()
    tables = read_manifests(manifests)
    num_classes = num_train_identities(tables)
    dataset = CropDataset(
        tables,
        num_classes,
        cfg.crop_height,
        cfg.crop_width,
        cfg.background_ratio,
        hflip=cfg.hflip,
        seed=cfg.seed,
        context=cfg.crop_context,
    )
    seed_everything(cfg.seed)  # the same initial weights on every rank and every run
    model = build_idnet(params.model, params.train.loss, num_classes, cfg.crop_context)
    fingerprint = ckpt.fingerprint(
        "pretrain",
        {
            "model": to_dict(params.model),
            "pretrain": to_dict(cfg),
            "loss": to_dict(params.train.loss),
        },
        data_version(manifests),
    )
    try:
        with tracked_run("pretrain", params, manifests, cfg.seed, ctx) as run:
            engine = Engine(
                model,
                dataset,
                forward_crops,
                cfg,
                ckpt.checkpoint_dir(out),
                fingerprint,
                log_metrics=metrics_logger(run),
                desc="pretrain",
                bn_forward=infer_crops,
                bn_batches=BN_BATCHES,
            )
            result = engine.fit(resume=resume)
            info: dict[str, Any] = {}
            if ctx.is_main:
                metrics = summary(result)
                labelled = int((dataset.labels < num_classes).sum())
                extra = {
                    "num_classes": num_classes,
                    "crops": len(dataset),
                    "labelled_crops": labelled,
                    "background_crops": len(dataset) - labelled,
                }
                meta = model_meta("pretrain", params, num_classes, result)
                # The crop geometry: extraction and the pyfunc cut crops as training did.
                meta.update(crop_height=cfg.crop_height, crop_width=cfg.crop_width)
                info = write_output(
                    out,
                    "idnet.pt",
                    engine.model,
                    meta,
                    run,
                    metrics,
                    extra,
                )
                log.info("pretrain: %s", info)
            barrier(ctx)
    finally:
        cleanup(ctx)
    return info
