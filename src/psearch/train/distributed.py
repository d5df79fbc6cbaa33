"""Process group, device and thread set-up for single-process and `torchrun` training."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from psearch.errors import PsearchError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_context() -> DistContext:
    """Ranks from the environment `torchrun` sets (a plain run is rank 0 of 1)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return DistContext(
        rank=int(env.get("RANK", "0")),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


def resolve_device(name: str, ctx: DistContext) -> torch.device:
    """`auto` = cuda when available, else cpu; under torchrun each rank takes its local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PsearchError(f"device: {name!r} is not a torch device (auto, cpu, cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PsearchError(f"device: {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup(device: torch.device, ctx: DistContext) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) and share the CPU cores fairly."""
    if device.type == "cpu":
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // ctx.local_world_size))
    if ctx.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def broadcast_object(value, ctx: DistContext):
    """Rank 0's `value` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, ctx: DistContext) -> list:
    if not ctx.distributed:
        return [value]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def all_gather_batch(
    features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (features, labels) in rank order (sizes may differ).

    Installed as the OIM loss's `sync` under DDP so every replica applies the whole
    global batch to its lookup table and queue, keeping them identical across ranks.
    """
    world = dist.get_world_size()
    count = torch.tensor([len(labels)], device=labels.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    pad = longest - len(labels)
    padded_f = torch.cat([features, features.new_zeros((pad, features.shape[1]))])
    padded_l = torch.cat([labels, labels.new_zeros((pad,))])
    all_f = [torch.empty_like(padded_f) for _ in range(world)]
    all_l = [torch.empty_like(padded_l) for _ in range(world)]
    dist.all_gather(all_f, padded_f.contiguous())
    dist.all_gather(all_l, padded_l.contiguous())
    return (
        torch.cat([f[:n] for f, n in zip(all_f, sizes, strict=True)]),
        torch.cat([lab[:n] for lab, n in zip(all_l, sizes, strict=True)]),
    )


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
