"""Training checkpoints in `<out>.ckpt/`: model, optimiser, scheduler, RNG and data position.

The stage output directory is written atomically (complete or absent), so the
checkpoints that must survive a kill live in a sibling directory. A checkpoint
records a fingerprint of everything that shapes the training trajectory; resuming
with different settings is refused (with a warning) and training starts fresh.
Checkpoints exist only to resume an interrupted run: a training that finished discards
them (`discard`), so a rerun (`dvc repro --force`) trains from scratch.
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
from psearch.errors import PsearchError
from psearch.tensorfile import load_tensor_file

CKPT_SUFFIX = ".ckpt"
_NAME = re.compile(r"^step-(\d+)\.pt$")
_TEMP = re.compile(r"^\.?step-\d+\.pt\.tmp-")  # psearch.atomic's temporary name of one
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


# The code that shapes a training trajectory: a checkpoint made by other code is not resumed
# (it could not end where an uninterrupted run of this code ends).
TRAJECTORY_CODE = ("data", "models", "train", "imaging.py")


def code_version() -> str:
    """A hash of psearch's training code (TRAJECTORY_CODE), read from the installed package."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in TRAJECTORY_CODE:
        files = sorted((root / part).rglob("*.py")) if (root / part).is_dir() else [root / part]
        for path in files:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(stage: str, sections: dict[str, Any], data_version: str, extra: str = "") -> str:
    """A short hash of the stage's settings (NEUTRAL_KEYS removed), the data version and the
    training code's version."""
    cleaned = {
        name: {k: v for k, v in section.items() if k not in NEUTRAL_KEYS}
        for name, section in sections.items()
    }
    blob = json.dumps(
        {
            "stage": stage,
            "params": cleaned,
            "data": data_version,
            "extra": extra,
            "code": code_version(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, which `weights_only` loading accepts
    (numpy's state tuple holds an array and python's a tuple of ints: both become tensors)."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["bit_generator"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    saved = state["python"]
    random.setstate((saved["version"], tuple(saved["internal"].tolist()), saved["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 1) -> Path:
    """Write `step-<N>.pt` atomically, then drop all but the newest `keep` checkpoints.

    A failed write (a full disk) leaves the previous checkpoint as it was, and no empty
    directory where there was none."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    try:
        with atomic_file(path) as tmp:
            torch.save(state, tmp)
    except BaseException:
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
    older = sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p != path)
    for old in older[: max(0, len(older) - keep + 1)]:
        old.unlink(missing_ok=True)
    return path


def discard(directory: Path) -> None:
    """Remove the checkpoints in `directory` (and a temporary file a killed write left),
    then the directory itself when nothing else is in it: the run they served has finished.
    Only files this module writes are removed; a directory shared with anything else stays."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.is_file() and (_NAME.match(path.name) or _TEMP.match(path.name)):
            path.unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents; PsearchError for a corrupt or foreign file, or one that
    would run code (a checkpoint directory may be shared, so its files are not trusted)."""
    state = load_tensor_file(path, "checkpoint")
    if not isinstance(state, dict):
        raise PsearchError(f"{path}: not a psearch checkpoint (no mapping at the top level)")
    return state
