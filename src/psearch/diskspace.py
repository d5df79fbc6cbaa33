"""Free space before the work: a stage checks that the file systems it will write to hold
what it is about to write, and refuses with one line before it starts (PsearchError, exit 2)
rather than failing with a full disk after minutes or hours of work.

The sizes are estimates from what a stage knows at its start (the preset, the model's
parameter count, detections per image times images, vectors times dimensions), on the high
side; a location that does not exist yet is measured at its nearest existing parent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from psearch.errors import PsearchError

MIB = 1 << 20
# Below any estimate: what a stage writes besides its main payload (JSON, Parquet footers).
SMALL = MIB


def human(size: float) -> str:
    """Bytes as 1.5 GiB / 20.0 MiB / 512 B."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where its bytes will land)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(needs: dict[Path, int]) -> None:
    """Refuse unless each file system has room for everything `needs` ({path: bytes}) puts
    on it (paths on one device are summed); the message names the first path of that device."""
    by_device: dict[int, tuple[Path, Path, int]] = {}
    for path, size in needs.items():
        where = _existing(path)
        device = os.stat(where).st_dev
        first, place, total = by_device.get(device, (Path(path), where, 0))
        by_device[device] = (first, place, total + int(size))
    for path, place, need in by_device.values():
        free = shutil.disk_usage(place).free
        if free < need:
            raise PsearchError(
                f"not enough free space in {path}: need {human(need)}, have {human(free)}"
            )
