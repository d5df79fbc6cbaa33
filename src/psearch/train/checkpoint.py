"""Training checkpoints in `<out>.ckpt/`: model, optimiser, scheduler, RNG and data position.

The stage output directory is written atomically (complete or absent), so the
checkpoints that must survive a kill live in a sibling directory. A checkpoint
records a fingerprint of everything that shapes the training trajectory; resuming
with different settings is refused (with a warning) and training starts fresh.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psearch.atomic import atomic_file

CKPT_SUFFIX = ".ckpt"
_NAME = re.compile(r"^step-(\d+)\.pt$")
# Settings that do not change the trajectory, so a resume may change them freely.
NEUTRAL_KEYS = (
    "num_workers",
    "device",
    "checkpoint_every",
    "log_every",
    "max_steps",
    "epochs",
    "max_iters",
)


def checkpoint_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + CKPT_SUFFIX)


def fingerprint(stage: str, sections: dict[str, Any], data_version: str, extra: str = "") -> str:
    """A short hash of the stage's settings (NEUTRAL_KEYS removed) and the data version."""
    cleaned = {
        name: {k: v for k, v in section.items() if k not in NEUTRAL_KEYS}
        for name, section in sections.items()
    }
    blob = json.dumps(
        {"stage": stage, "params": cleaned, "data": data_version, "extra": extra},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 1) -> Path:
    """Write `step-<N>.pt` atomically, then drop all but the newest `keep` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    older = sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p != path)
    for old in older[: max(0, len(older) - keep + 1)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    # Our own files: they hold numpy/python RNG states, which weights_only refuses.
    return torch.load(path, map_location="cpu", weights_only=False)
