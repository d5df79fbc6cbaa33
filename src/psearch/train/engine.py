"""The training loop shared by IDNet pretraining and joint training.

SGD with momentum, linear warm-up then x0.1 at each of `lr_steps`, autocast (bf16/fp16) on
CUDA only, gradient clipping, DistributedDataParallel under `torchrun`, a tqdm
bar with the loss and images/s, metrics every `log_every` steps, and checkpoints
every `checkpoint_every` steps from which `resume` continues exactly: model,
optimiser, scheduler, grad scaler, every RNG and the sampler's position.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from psearch.config import TrainLoopConfig
from psearch.data.loaders import EpochSampler, make_loader
from psearch.errors import PsearchError
from psearch.train import checkpoint as ckpt
from psearch.train.distributed import (
    DistContext,
    all_gather_batch,
    barrier,
    dist_context,
    gather_objects,
    resolve_device,
    setup,
)

log = logging.getLogger(__name__)
WARMUP_START = 0.1  # lr factor at step 0 of the warm-up
BN_EPOCH = 1_000_000  # sampler epoch of the BatchNorm recalibration batches (not a training one)

# forward(model, batch, device) -> (dict of loss_* / acc_* tensors, images in the batch)
ForwardFn = Callable[[nn.Module, Any, torch.device], tuple[dict[str, torch.Tensor], int]]
MetricsFn = Callable[[dict[str, float], int], None]


@dataclass
class FitResult:
    steps: int
    resumed_from: int  # step of the checkpoint the run continued from (0 = fresh start)
    seconds: float
    images_per_second: float
    # Mean of every loss_* / acc_* (and their sum, `loss`) over the last epoch this run trained.
    metrics: dict[str, float] = field(default_factory=dict)


def lr_factor(step: int, warmup_iters: int, lr_steps: list[int]) -> float:
    """Linear warm-up from WARMUP_START to 1, then x0.1 from each of `lr_steps` on."""
    factor = 1.0
    if warmup_iters > 0 and step < warmup_iters:
        factor = WARMUP_START + (1.0 - WARMUP_START) * step / warmup_iters
    return factor * 0.1 ** sum(1 for at in lr_steps if 0 < at <= step)


def schedule_length(cfg: TrainLoopConfig, steps_per_epoch: int) -> int:
    """Iterations of the schedule: `max_iters` when set, else `epochs` passes over the data."""
    return cfg.max_iters if cfg.max_iters > 0 else cfg.epochs * steps_per_epoch


def build_optimizer(model: nn.Module, cfg: TrainLoopConfig) -> torch.optim.SGD:
    """SGD; no weight decay on biases and norm layers, as detection codebases do."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _install_oim_sync(model: nn.Module, ctx: DistContext) -> None:
    """Keep OIM lookup tables and queues identical across DDP replicas."""
    if not ctx.distributed:
        return
    for module in model.modules():
        if hasattr(module, "sync") and hasattr(module, "lut"):
            module.sync = all_gather_batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Engine:
    """Trains `model` on `dataset` with the loop settings of the `pretrain` or `train` section."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        forward: ForwardFn,
        cfg: TrainLoopConfig,
        ckpt_dir: Path | None,
        fingerprint: str,
        collate_fn=None,
        log_metrics: MetricsFn | None = None,
        desc: str = "train",
        progress: bool = True,
        bn_forward: ForwardFn | None = None,
        bn_batches: int = 0,
    ) -> None:
        self.ctx = dist_context()
        self.device = resolve_device(cfg.device, self.ctx)
        setup(self.device, self.ctx)
        self.cfg = cfg
        self.model = model.to(self.device)
        self.dataset = dataset
        self.forward = forward
        self.ckpt_dir = ckpt_dir
        self.fingerprint = fingerprint
        self.collate_fn = collate_fn
        self.log_metrics = log_metrics if self.ctx.is_main else None
        self.desc = desc
        self.bn_forward = bn_forward  # the inference pass used by recalibrate_batch_norm
        self.bn_batches = bn_batches
        self.progress = progress and self.ctx.is_main
        self.sampler = EpochSampler(
            dataset,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=self.ctx.distributed,
        )
        per_rank = self.sampler.num_samples
        if per_rank < cfg.batch_size:
            self.steps_per_epoch = 1 if per_rank else 0
        else:
            self.steps_per_epoch = per_rank // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise PsearchError(f"{desc}: the training set is empty")
        self.total_steps = schedule_length(cfg, self.steps_per_epoch)
        if cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_iters, cfg.lr_steps)
        )
        use_scaler = self.device.type == "cuda" and cfg.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.step = 0
        self.resumed_from = 0
        self.meter = _Meter()
        # Each log window's loss_* / acc_* means and lr, by step (history.csv).
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        rngs = gather_objects(ckpt.rng_state(), self.ctx)  # one per rank
        return {
            "fingerprint": self.fingerprint,
            "world_size": self.ctx.world_size,
            "step": self.step,
            "model": self._bare_model().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            # The running means, so run.json's final metrics after a resume are those of an
            # uninterrupted run (rank 0's, which is the one that reports them).
            "meter": self.meter.state_dict(),
            # The log windows so far, so history.csv after a resume is an uninterrupted run's.
            "history": list(self.history),
        }

    def save(self) -> None:
        state = self._state()  # every rank takes part in gathering the RNG states
        if self.ctx.is_main and self.ckpt_dir is not None:
            ckpt.save_checkpoint(self.ckpt_dir, self.step, state)
        barrier(self.ctx)

    def try_resume(self) -> bool:
        """Continue from the newest checkpoint when its fingerprint matches; else start fresh."""
        path = ckpt.latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        if path is None:
            return False
        try:
            state = ckpt.load_checkpoint(path)
        except PsearchError as exc:  # truncated by a full disk, say, or planted to run code
            warnings.warn(f"{exc}; starting fresh", stacklevel=2)
            return False
        if state.get("fingerprint") != self.fingerprint:
            warnings.warn(
                f"{path}: checkpoint was made with other settings, data or training code; starting fresh",
                stacklevel=2,
            )
            return False
        if state.get("world_size") != self.ctx.world_size:
            warnings.warn(
                f"{path}: checkpoint was made with {state.get('world_size')} processes, "
                f"this run has {self.ctx.world_size}; starting fresh",
                stacklevel=2,
            )
            return False
        self._bare_model().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"][self.ctx.rank])
        self.meter.load_state_dict(state.get("meter") or {})
        self.history = list(state.get("history") or [])
        self.step = self.resumed_from = int(state["step"])
        return True

    @torch.no_grad()
    def recalibrate_batch_norm(self) -> None:
        """Recompute BatchNorm running statistics as exact averages over a few batches.

        torchvision's MobileNetV3 updates them with momentum 0.01, so after a short
        from-scratch run (the CPU demo) they still mostly hold their initial values and
        the model collapses in eval mode. "Precise BN" (as in Detectron) fixes that: the
        model runs its inference path (`bn_forward`) with only the norm layers in train
        mode and momentum None (a cumulative average). Same batches on every run, so a
        resumed run still ends bit-identical.
        """
        model = self._bare_model()
        norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats
            and not getattr(m, "frozen_statistics", False)  # the recipe keeps ImageNet's
        ]
        if not norms or self.bn_forward is None or self.bn_batches <= 0:
            return
        model.eval()
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        sampler = EpochSampler(
            self.dataset, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=self.cfg.seed
        )
        sampler.set_position(BN_EPOCH, 0)
        loader = make_loader(
            self.dataset,
            sampler,
            self.cfg.batch_size,
            self.cfg.num_workers,
            seed=self.cfg.seed,
            collate_fn=self.collate_fn,
        )
        with _autocast(self.device, self.cfg.amp):
            for index, batch in enumerate(loader):
                if index >= self.bn_batches:
                    break
                self.bn_forward(model, batch, self.device)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train()

    def _check_replicas_agree(self) -> None:
        """Under DDP every rank must end with the same weights and OIM tables; say so if not."""
        if not self.ctx.distributed:
            return
        model = self._bare_model()
        tensors = list(model.parameters()) + [
            b for name, b in model.named_buffers() if name.endswith(("lut", "queue"))
        ]
        checksum = float(sum(t.detach().double().sum().item() for t in tensors))
        sums = gather_objects(checksum, self.ctx)
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(checksum)):
            warnings.warn(f"{self.desc}: DDP replicas disagree (checksums {sums})", stacklevel=2)

    def _bare_model(self) -> nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    # ------------------------------------------------------------------ the loop

    def _train_step(self, batch) -> tuple[dict[str, float], int]:
        with _autocast(self.device, self.cfg.amp):
            outputs, images = self.forward(self.model, batch, self.device)
        loss = sum(v.float() for k, v in outputs.items() if k.startswith("loss_"))
        if not torch.isfinite(loss):
            raise PsearchError(
                f"{self.desc}: loss became {loss.item()} at step {self.step + 1}; "
                f"lower the learning rate ({self.desc}.lr={self.cfg.lr})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        values = {k: float(v.detach()) for k, v in outputs.items()}
        values["loss"] = float(loss.detach())
        return values, images

    def fit(self, resume: bool = False) -> FitResult:
        # On CPU, deterministic kernels (e.g. the sorted scatter-add behind RSS's gathered
        # classifier rows) make a resumed run bit-identical to an uninterrupted one; on CUDA
        # the fast kernels win (roi_pool's backward has no deterministic CUDA version).
        previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        fill = torch.utils.deterministic.fill_uninitialized_memory
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Filling every new tensor with NaN (a debugging aid) costs more than training.
            torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            return self._fit(resume)
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.utils.deterministic.fill_uninitialized_memory = fill

    def _fit(self, resume: bool) -> FitResult:
        # The training stream (RoI sampling, RSS classes, dropout) differs per rank; a
        # checkpoint's RNG states replace it on resume.
        seed_everything(self.cfg.seed + 1000 * self.ctx.rank + 1)
        meter = self.meter = _Meter()
        self.history = []
        if resume:
            self.try_resume()
        self._wrap_for_ddp()
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.desc,
            disable=not self.progress,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        epoch, position = divmod(self.step, self.steps_per_epoch)
        try:
            while self.step < self.total_steps:
                self._train_epoch(epoch, position, meter, bar)
                epoch, position = epoch + 1, 0
        finally:  # end the bar's line before any error is printed after it
            bar.close()
        self.recalibrate_batch_norm()
        seconds = time.perf_counter() - meter.started
        self._check_replicas_agree()
        self.model = self._bare_model()
        return FitResult(
            steps=self.step,
            resumed_from=self.resumed_from,
            seconds=seconds,
            images_per_second=meter.images_seen / seconds if seconds > 0 else math.nan,
            metrics=meter.epoch_means(),
        )

    def _wrap_for_ddp(self) -> None:
        if self.ctx.distributed:
            _install_oim_sync(self.model, self.ctx)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)

    def _train_epoch(self, epoch: int, position: int, meter: _Meter, bar: tqdm) -> None:
        """Steps of `epoch` from batch `position` on, until the epoch or the run ends."""
        self.sampler.set_position(epoch, position * self.cfg.batch_size)
        loader = make_loader(
            self.dataset,
            self.sampler,
            self.cfg.batch_size,
            self.cfg.num_workers,
            seed=self.cfg.seed,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
        )
        if position == 0:  # a resumed epoch keeps the means of its steps before the stop
            meter.new_epoch()
        for batch in loader:
            values, images = self._train_step(batch)
            self.step += 1
            meter.add(values, images * self.ctx.world_size)
            if self.step % max(1, self.cfg.log_every) == 0 or self.step == self.total_steps:
                self._report(meter, bar)
                meter.new_window()
            bar.update(1)
            every_ckpt = self.cfg.checkpoint_every
            if self.ckpt_dir is not None and every_ckpt > 0 and self.step % every_ckpt == 0:
                self.save()
            if self.step >= self.total_steps:
                break

    def _report(self, meter: _Meter, bar: tqdm) -> None:
        """The log window's means, the lr and images/s: to MLflow and the progress bar."""
        metrics = meter.window_means()
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        # history.csv keeps what a rerun reproduces: the losses and lr, not the speed.
        self.history.append({"step": self.step, **metrics})
        metrics["images_per_s"] = meter.window_images_per_second()
        if self.log_metrics is not None:
            self.log_metrics(metrics, self.step)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", img_s=f"{metrics['images_per_s']:.1f}")


class _Meter:
    """Per-step values averaged over the log window and over the epoch, and images/s."""

    def __init__(self) -> None:
        self.window: dict[str, list[float]] = defaultdict(list)
        self.epoch: dict[str, list[float]] = defaultdict(list)
        self.new_window()
        self.started, self.images_seen = time.perf_counter(), 0

    def new_window(self) -> None:
        self.window.clear()
        self.window_images, self.window_start = 0, time.perf_counter()

    def new_epoch(self) -> None:
        self.epoch.clear()

    def add(self, values: dict[str, float], images: int) -> None:
        self.images_seen += images
        self.window_images += images
        for key, value in values.items():
            self.window[key].append(value)
            self.epoch[key].append(value)

    def state_dict(self) -> dict[str, Any]:
        """The epoch's and the log window's values so far, as tensors (for a checkpoint)."""
        return {
            "epoch": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.epoch.items()},
            "window": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.window.items()},
            "window_images": self.window_images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("epoch", "window"):
            values = getattr(self, name)
            values.clear()
            for key, tensor in state.get(name, {}).items():
                values[key] = tensor.tolist()
        self.window_images = int(state.get("window_images", 0))

    def window_means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.window.items()}

    def window_images_per_second(self) -> float:
        return self.window_images / max(time.perf_counter() - self.window_start, 1e-9)

    def epoch_means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.epoch.items()}
