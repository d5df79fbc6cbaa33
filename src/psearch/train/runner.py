"""One training stage around the engine, shared by IDNet pretraining and joint training.

A stage (pretrain.py, joint.py) subclasses `TrainingStage` with what differs: its dataset,
network, forward passes and the extras it records. `TrainingStage.run` does everything
else the same way for both: reading the manifests, seeding the initial weights, the
checkpoint fingerprint, the stage's MLflow run (rank 0), the engine, and on rank 0 the
output directory (model file + run.json, atomically) with its metrics and logged model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from psearch.atomic import atomic_dir, check_writable
from psearch.config import Params, TrainLoopConfig, to_dict
from psearch.data.loaders import num_train_identities
from psearch.data.manifest import Manifests, read_manifests
from psearch.digest import file_sha256
from psearch.diskspace import SMALL, check_free_space
from psearch.models.io import save_model
from psearch.tracking import MODEL_SHA256_TAG, data_version, stage_metrics, stage_run
from psearch.train import checkpoint as ckpt
from psearch.train.distributed import DistContext, barrier, cleanup, dist_context
from psearch.train.engine import Engine, FitResult, ForwardFn, MetricsFn, seed_everything

log = logging.getLogger(__name__)
RUN_FILE = "run.json"  # beside the model file: the run's summary (and a skipped stage's marker)
# What a training execution returns but run.json leaves out: facts of that execution (MLflow
# ids, wall time, speed, a resume) that differ between two runs with the same result.
RUN_FACTS = (
    "run_id",
    "model_uri",
    "logged_model_uri",
    "resumed_from_step",
    "train_seconds",
    "images_per_s",
)

# (model file, artifact name) -> (runs:/ URI, models:/ URI) of the model logged to the active
# MLflow run. The stage function passes psearch.serving's in: train sits below serving.
ModelLogger = Callable[[Path, str], tuple[str, str]]


class TrainingStage:
    """A training stage: subclasses set the class attributes and the methods marked so."""

    name: str  # "pretrain" | "train": the params section, MLflow run, progress bar, fingerprint
    model_file: str  # written into the output directory
    forward: ForwardFn  # the training pass (a staticmethod)
    infer: ForwardFn  # the inference pass that recomputes BatchNorm statistics after training
    bn_batches: int  # batches of `infer` for that
    collate_fn: Callable | None = None

    def __init__(self, params: Params) -> None:
        self.params = params
        self.cfg: TrainLoopConfig = getattr(params, self.name)

    # ------------------------------------------------------------ what each stage defines

    def build_dataset(self, tables: Manifests, num_classes: int) -> Dataset:
        raise NotImplementedError

    def build_model(self, num_classes: int) -> nn.Module:
        """The network to train (the global RNG is seeded just before: same weights each run)."""
        raise NotImplementedError

    def fingerprint_sections(self) -> dict[str, Any]:
        """The params sections that shape the training trajectory (see checkpoint.fingerprint)."""
        raise NotImplementedError

    def fingerprint_extra(self) -> str:
        """Anything else that shapes it (the init weights, say)."""
        return ""

    def model_meta(self) -> dict[str, Any]:
        """Added to the model file's meta."""
        return {}

    def run_info(self, dataset: Dataset, num_classes: int) -> dict[str, Any]:
        """Added to run.json after num_classes."""
        return {}

    def startup_checks(self, tables: Manifests) -> list[str]:
        """Lines printed before training starts (rank 0): what the user should know first."""
        return []

    def log_to_run(self) -> None:
        """Stage-specific details for the active MLflow run."""

    # ------------------------------------------------------------ the same for every stage

    def run(
        self,
        manifests: Path,
        out: Path,
        resume: bool = False,
        log_model: ModelLogger | None = None,
        checkpoint_dir: Path | None = None,
    ) -> dict[str, Any]:
        """Train; on rank 0 write `out/<model_file>` and `out/run.json` and return what run.json
        holds (empty on other ranks). `log_model` None: the model is not logged to MLflow.
        `checkpoint_dir` None: OUT.ckpt/ (a durable place of the caller's otherwise)."""
        ctx = dist_context()
        tables = read_manifests(manifests)
        check_writable(out)  # and so its checkpoint directory beside it: fail before training
        num_classes = num_train_identities(tables)
        dataset = self.build_dataset(tables, num_classes)
        if ctx.is_main:
            for line in self.startup_checks(tables):
                print(f"{self.name}: {line}", file=sys.stderr, flush=True)
        seed_everything(self.cfg.seed)  # the same initial weights on every rank and every run
        model = self.build_model(num_classes)
        fingerprint = ckpt.fingerprint(
            self.name,
            self.fingerprint_sections(),
            data_version(manifests),
            self.fingerprint_extra(),
        )
        checkpoints = Path(checkpoint_dir) if checkpoint_dir else ckpt.checkpoint_dir(out)
        if ctx.is_main:
            check_free_space(space_needed(model, out, checkpoints, self.cfg.checkpoint_every > 0))
        try:
            with tracked_run(self.name, self.params, manifests, self.cfg.seed, ctx) as run:
                if run is not None:
                    self.log_to_run()
                engine = Engine(
                    model,
                    dataset,
                    self.forward,
                    self.cfg,
                    checkpoints,
                    fingerprint,
                    collate_fn=self.collate_fn,
                    log_metrics=metrics_logger(run, self.name),
                    desc=self.name,
                    bn_forward=self.infer,
                    bn_batches=self.bn_batches,
                )
                result = engine.fit(resume=resume)
                info: dict[str, Any] = {}
                if ctx.is_main:
                    meta = {**self._meta(num_classes, result), **self.model_meta()}
                    extra = {"num_classes": num_classes, **self.run_info(dataset, num_classes)}
                    info = write_output(
                        out,
                        self.model_file,
                        engine.model,
                        meta,
                        run,
                        summary(result),
                        extra,
                        log_model,
                    )
                    log.info("%s: %s", self.name, info)
                    # The output is in place: the checkpoints served only to resume this run,
                    # and a rerun (`dvc repro --force`) must train from scratch.
                    ckpt.discard(checkpoints)
                barrier(ctx)
        finally:
            cleanup(ctx)
        return info

    def _meta(self, num_classes: int, result: FitResult) -> dict[str, Any]:
        return {
            "stage": self.name,
            "num_classes": num_classes,
            "steps": result.steps,
            "seed": self.cfg.seed,
            "model": to_dict(self.params.model),
            "loss": to_dict(self.params.train.loss),
        }


def space_needed(
    model: nn.Module, out: Path, checkpoints: Path, checkpointing: bool = True
) -> dict[Path, int]:
    """What training writes: the model file, and (`checkpointing`) in the checkpoint directory
    two checkpoints (a new one is complete before the old one goes) of the weights and as much
    again of optimiser state (SGD's momentum buffers)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needs = {Path(out): weights + SMALL}
    if checkpointing:
        needs[Path(checkpoints)] = 4 * weights + SMALL
    return needs


@contextlib.contextmanager
def tracked_run(
    stage: str, params: Params, manifests: Path, seed: int, ctx: DistContext
) -> Iterator[Any]:
    """The stage's MLflow run on rank 0 (None on other ranks or with tracking disabled)."""
    if not ctx.is_main:
        yield None
        return
    # The training split is the stage's dataset input; the machine's use is sampled.
    with stage_run(stage, params, manifests, seed=seed, split="train", system_metrics=True) as run:
        if run is not None:
            import mlflow  # lazy: seconds to import; only a tracked run needs it

            mlflow.set_tag("psearch.world_size", str(ctx.world_size))
        yield run


def metrics_logger(run, stage: str) -> MetricsFn | None:
    """Per-step metrics (losses, lr, images/s) into the active MLflow run, as `<stage>/<key>`."""
    if run is None:
        return None
    import mlflow  # lazy: seconds to import; only a tracked run needs it

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        mlflow.log_metrics(stage_metrics(stage, finite), step=step)

    return log_metrics


def summary(result: FitResult) -> dict[str, float]:
    """Final metrics of a fit: the last epoch's mean losses/accuracies, steps and speed."""
    out = {f"final_{k}": round(v, 6) for k, v in sorted(result.metrics.items())}
    out["steps"] = result.steps
    out["resumed_from_step"] = result.resumed_from
    out["train_seconds"] = round(result.seconds, 2)
    out["images_per_s"] = round(result.images_per_second, 3)
    return out


def write_output(
    out: Path,
    file_name: str,
    model: nn.Module,
    meta: dict[str, Any],
    run,
    metrics: dict[str, float],
    extra: dict[str, Any],
    log_model: ModelLogger | None = None,
) -> dict[str, Any]:
    """Write `out/<file_name>` and `out/run.json` atomically; in an MLflow run, log the
    metrics (as `<meta's stage>/<key>`), (with `log_model`) the model, and tag the run with
    the model file's hash. Returns run.json's content plus the facts of this execution
    (RUN_FACTS: the MLflow ids, timings, the step resumed from).

    run.json holds only what the same training from scratch reproduces byte for byte, so a
    DVC output hashes the same on every such run; the execution's facts go to the MLflow run
    (its metrics and the tags MODEL_SHA256_TAG, `psearch.model_uri`, `psearch.logged_model_uri`)
    and the printed summary."""
    info: dict[str, Any] = {"run_id": run.info.run_id if run is not None else None}
    with atomic_dir(out) as tmp:
        save_model(tmp / file_name, model, meta)
        if run is not None:
            import mlflow  # lazy: seconds to import; only a tracked run needs it

            logged = {k: float(v) for k, v in metrics.items()}
            mlflow.log_metrics(stage_metrics(meta["stage"], logged))
            if log_model is not None:
                info["model_uri"], info["logged_model_uri"] = log_model(tmp / file_name, "model")
            tags = {MODEL_SHA256_TAG: file_sha256(tmp / file_name)}
            tags.update({f"psearch.{k}": v for k, v in info.items() if k.endswith("model_uri")})
            mlflow.set_tags(tags)
        info.update(extra)
        info.update(metrics)
        record = {k: v for k, v in info.items() if k not in RUN_FACTS}
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return info
