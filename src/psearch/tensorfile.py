"""Reading torch files (models, IDNets, backbone weights, training checkpoints) without running code.

Every torch file psearch reads may come from someone else (a shared volume, a DVC cache, a
registry), so all go through `load_tensor_file`: `torch.load(weights_only=True)` builds only
tensors and plain containers and refuses anything that would import or call code. Its
refusal is reworded into one line that names the file and what it tried to load, without
torch's advice to retry with `weights_only=False` (which would run the file's code).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from psearch.errors import PsearchError

# The text around torch's own reason: the weights_only hint and the pointers to its docs.
_HINT_LINES = ("weights only load failed", "weights_only", "check the documentation")
_GLOBAL = re.compile(r"\bGLOBAL (\S+)")


def load_tensor_file(path: str | Path, what: str) -> Any:
    """The contents of the torch file `path` (tensors and plain containers only, on the CPU).

    `what` names the kind of file in the error ("model file", "checkpoint"...).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PsearchError(f"{path}: {what} not found") from None
    except Exception as exc:  # torch raises many kinds for a corrupt, foreign or hostile file
        raise PsearchError(f"{path}: {refusal_reason(exc, what)}") from None


def refusal_reason(exc: BaseException, what: str) -> str:
    """One line saying why torch would not load a file, without its `weights_only` hint."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        name = found.group(1).rstrip(".,")
        return (
            f"refused to load this {what}: it asks to run or build {name} "
            "(only tensors and plain values are allowed)"
        )
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not any(hint in line.lower() for hint in _HINT_LINES)
    ]
    reason = lines[0] if lines else type(exc).__name__
    return f"not a readable {what} ({reason[:200]})"
