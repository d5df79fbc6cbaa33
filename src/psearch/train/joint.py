"""Joint detection + re-identification training (`psearch train`).

Two scene images per mini-batch train the proposal network, the person/background
classifier, the box regressor and the identity loss together. The paper found this
does not converge from a generic initialisation with sparse identity labels; start
from an IDNet (`--init`, see pretrain.py) and use the RSS loss.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from psearch.config import Params, to_dict
from psearch.data.loaders import SceneDataset, list_collate, num_train_identities
from psearch.data.manifest import read_manifests
from psearch.errors import PsearchError
from psearch.tracking import data_version
from psearch.train import checkpoint as ckpt
from psearch.train.distributed import barrier, cleanup, dist_context
from psearch.train.engine import Engine, seed_everything
from psearch.train.runner import metrics_logger, model_meta, summary, tracked_run, write_output

log = logging.getLogger(__name__)
BN_BATCHES = 32  # batches of scenes that recompute BatchNorm statistics after training
IDNET_FILE = "idnet.pt"


def forward_scenes(model, batch, device: torch.device):
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    return model(images, targets), len(images)


def infer_scenes(model, batch, device: torch.device) -> None:
    """The inference pass (for BatchNorm recalibration)."""
    model([image.to(device, non_blocking=True) for image in batch[0]])


def resolve_init(init: Path) -> Path:
    """An idnet.pt file, or a directory holding one (the pretrain stage's output)."""
    init = Path(init)
    if init.is_dir():
        init = init / IDNET_FILE
    if not init.is_file():
        raise PsearchError(f"{init}: IDNet weights not found (--init takes idnet.pt or its dir)")
    return init


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_idnet_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PsearchError(f"{path}: not a readable IDNet file ({first[:200]})") from None


def train(
    manifests: Path,
    out: Path,
    params: Params,
    init: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the joint net; write `out/model.pt`, `out/run.json` and log the model to MLflow."""
    from psearch.models.idnet import transfer_idnet_weights
    from psearch.models.joint import build_joint_net

    cfg = params.train
    ctx = dist_context()
    init_path = resolve_init(init) if init is not None else None
    tables = read_manifests(manifests)
    num_classes = num_train_identities(tables)
    dataset = SceneDataset(tables, num_classes, "train", hflip=cfg.hflip, seed=cfg.seed)
    seed_everything(cfg.seed)  # the same initial weights on every rank and every run
    model = build_joint_net(params.model, cfg.loss, num_classes)
    transferred: list[str] = []
    if init_path is not None:
        transferred = transfer_idnet_weights(model, load_idnet_state(init_path))
    elif cfg.loss.reid_loss != "oim":
        warnings.warn(
            "train: no --init given; the paper found joint training from a generic "
            "initialisation converges poorly with sparse identity labels (run pretrain first)",
            stacklevel=2,
        )
    fingerprint = ckpt.fingerprint(
        "train",
        {"model": to_dict(params.model), "train": to_dict(cfg)},
        data_version(manifests),
        extra=file_digest(init_path) if init_path is not None else "",
    )
    try:
        with tracked_run("train", params, manifests, cfg.seed, ctx) as run:
            if run is not None:
                _log_init(init_path, transferred)
            engine = Engine(
                model,
                dataset,
                forward_scenes,
                cfg,
                ckpt.checkpoint_dir(out),
                fingerprint,
                collate_fn=list_collate,
                log_metrics=metrics_logger(run),
                desc="train",
                bn_forward=infer_scenes,
                bn_batches=BN_BATCHES,
            )
            result = engine.fit(resume=resume)
            info: dict[str, Any] = {}
            if ctx.is_main:
                extra = {
                    "num_classes": num_classes,
                    "train_images": len(dataset),
                    "init": str(init_path) if init_path is not None else None,
                    "init_transferred_keys": len(transferred),
                }
                info = write_output(
                    out,
                    "model.pt",
                    engine.model,
                    model_meta("train", params, num_classes, result),
                    run,
                    summary(result),
                    extra,
                )
                log.info("train: %s", info)
            barrier(ctx)
    finally:
        cleanup(ctx)
    return info


def _log_init(init_path: Path | None, transferred: list[str]) -> None:
    import mlflow

    mlflow.set_tag("psearch.init", str(init_path) if init_path is not None else "none")
    mlflow.log_param("init.transferred_keys", len(transferred))
    if transferred:
        mlflow.log_text("\n".join(transferred) + "\n", "init/transferred_keys.txt")
