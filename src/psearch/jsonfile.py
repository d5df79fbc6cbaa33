"""Reading the small JSON files stages hand each other (run.json, metrics.json, extraction.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from psearch.errors import PsearchError


def read_json_object(path: str | Path, missing: str = "file not found") -> dict[str, Any]:
    """The JSON object in `path`; a one-line PsearchError naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PsearchError(f"{path}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise PsearchError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PsearchError(f"{path}: expected a JSON object")
    return data
