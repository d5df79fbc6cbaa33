"""Atomic outputs: write to a temporary sibling, rename into place on success.

A failed or killed run therefore leaves either the complete previous output or
nothing where the final file or directory would be (DVC relies on this). What a
killed run leaves beside it (`.NAME.tmp-PID-HOST-*`, hidden) is removed by the
next write of the same output, once that process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from psearch.errors import PsearchError

# Temporaries are named after the process and machine that made them, so the next run can tell
# a killed run's leftovers (same machine, process gone) from a live writer's (on a shared volume
# another machine's are never touched).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}-{_HOST}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `final` left beside it on this machine; returns them."""
    final = Path(final)
    ours = re.compile(re.escape(f".{final.name}.") + r"(?:tmp|old)-(\d+)-([0-9a-f]{8})-")
    removed = []
    for sibling in final.parent.iterdir() if final.parent.is_dir() else []:
        found = ours.match(sibling.name)
        if found and found.group(2) == _HOST and not _alive(int(found.group(1))):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, is_dir: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; give outputs the modes a plain mkdir/open would."""
    path.chmod((0o777 if is_dir else 0o666) & ~_umask())


def check_writable(final: str | os.PathLike) -> None:
    """Fail now rather than after the work when `final` cannot be written atomically: make its
    parent directory and a probe file in it (a PsearchError naming the output otherwise).

    A stage calls this before it starts, so a read-only or misspelt output location costs
    seconds, not a training run."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.probe-", dir=final.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and Path(exc.filename) != final else ""
        reason = exc.strerror or type(exc).__name__
        raise PsearchError(f"{final}: cannot write the output here ({reason}{where})") from None


def _name_the_final_path(exc: BaseException, tmp: Path, final: Path) -> None:
    """An OSError about the temporary copy names the output the user asked for instead
    (`out/metrics.json: No space left on device`, not `.out.tmp-x1y2/metrics.json`)."""
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if isinstance(name, str) and (name == str(tmp) or name.startswith(f"{tmp}{os.sep}")):
        exc.filename = str(final) + name[len(str(tmp)) :]


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final, "tmp"), dir=final.parent))
    _normal_mode(tmp, is_dir=True)
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_the_final_path(exc, tmp, final)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(final)
        # Move the old one aside first so the swap is as short as possible.
        old = final.with_name(_temp_prefix(final, "old") + "0")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it onto `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(final, "tmp"), dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    _normal_mode(tmp, is_dir=False)
    try:
        yield tmp
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _name_the_final_path(exc, tmp, final)
        raise
    os.replace(tmp, final)


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text)
