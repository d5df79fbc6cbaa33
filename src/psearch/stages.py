"""The stage functions: what each pipeline stage runs, for the command line (psearch.cli,
which DVC's dvc.yaml runs) and for Kubeflow (components/).

An implementation that already takes the stage's inputs, outputs and typed params is the
stage function itself, re-exported here (extract, extract_video, extract_merge, index,
evaluate, register, promote). The functions below add what the stage does around its
implementation: a params section turned into arguments (synth, ingest); a training stage run
with the serving layer's model logger, which the training code sits below and so is handed
(pretrain, train).
Importing this module imports torch: the command line imports it in the handlers that run a
stage, so `psearch --help` and `psearch evaluate` stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psearch.config import DataConfig, IngestConfig, Params
from psearch.data.ingest import ingest as ingest_dataset
from psearch.data.table import TableOptions
from psearch.evaluation.run import evaluate
from psearch.inference.extract import extract
from psearch.inference.index import build_index as index
from psearch.inference.shards import merge as extract_merge
from psearch.inference.video_extract import extract_video
from psearch.registry import promote, register
from psearch.synth import synthesize
from psearch.train.joint import JointTraining
from psearch.train.pretrain import Pretraining, write_skipped
from psearch.train.runner import ModelLogger

__all__ = [
    "evaluate",
    "extract",
    "extract_merge",
    "extract_video",
    "index",
    "ingest",
    "pretrain",
    "promote",
    "register",
    "synth",
    "train",
]


def synth(out: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write a synthetic dataset in the CUHK-SYSU layout to `out`."""
    return synthesize(Path(out), preset=cfg.preset, seed=cfg.seed)


def ingest(root: Path, out: Path, cfg: IngestConfig, absolute_root: bool = False) -> dict[str, Any]:
    """Read a raw CUHK-SYSU or PRW dataset, or a table of boxes, at `root`; write the
    manifests to `out` (`absolute_root`: dataset.json also names the root's absolute path)."""
    table = None
    if cfg.format == "table" and cfg.annotations:
        table = TableOptions(
            annotations=Path(cfg.annotations),
            queries=Path(cfg.queries) if cfg.queries else None,
            box_format=cfg.box_format,
            gallery_sizes=tuple(cfg.gallery_sizes),
            seed=cfg.seed,
        )
    return ingest_dataset(Path(root), Path(out), cfg.format, table, absolute_root)


def _model_logger(manifests: Path, whole_image: bool) -> ModelLogger:
    """Logs a trained model to the stage's MLflow run (psearch.serving's pyfunc wrapper), with
    an input example from `manifests`' test images (`whole_image`: not for an IDNet)."""

    def log(model_file: Path, name: str) -> tuple[str, str]:
        # lazy: mlflow.pyfunc and pandas take seconds to import and warn; only training logs
        from psearch.serving.pyfunc import example_input, log_model

        return log_model(model_file, name, example_input(manifests, whole_image))

    return log


def pretrain(
    manifests: Path,
    out: Path,
    params: Params,
    resume: bool = False,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """IDNet pretraining on cropped boxes; writes `out/idnet.pt` (and logs it to MLflow).
    A recipe without the stage (pretrain.enabled false) gets a marker directory instead.
    `checkpoint_dir` None: checkpoints in OUT.ckpt/ beside the output."""
    if not params.pretrain.enabled:
        return write_skipped(Path(out))
    stage = Pretraining(params)
    logger = _model_logger(Path(manifests), whole_image=False)
    return stage.run(Path(manifests), Path(out), resume, logger, checkpoint_dir)


def train(
    manifests: Path,
    out: Path,
    params: Params,
    init: Path | None = None,
    resume: bool = False,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Joint detection + re-id training; writes `out/model.pt` (and logs it to MLflow).
    `checkpoint_dir` None: checkpoints in OUT.ckpt/ beside the output."""
    stage = JointTraining(params, init=Path(init) if init else None)
    logger = _model_logger(Path(manifests), whole_image=True)
    return stage.run(Path(manifests), Path(out), resume, logger, checkpoint_dir)
