"""Robust access to MATLAB v5 annotation files, whatever tool wrote them.

`scipy.io.loadmat` returns structs as numpy record arrays and cells as object
arrays, but the same MATLAB value can arrive in several shapes: 1 x N or N x 1,
a struct array or a cell of 1 x 1 structs, an empty box as 1 x 0 or 0 x 0, a
string as a char row, a char column or a cell holding one. The accessors here
accept all of those and turn anything else into a `PsearchError` that names
the file and the element at fault.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.io as sio

from psearch.errors import PsearchError


def load_variable(path: Path, names: str | Iterable[str]) -> tuple[str, np.ndarray]:
    """(name, value) of the first of `names` present in the .mat file at `path`."""
    wanted = [names] if isinstance(names, str) else list(names)
    if not path.is_file():
        raise PsearchError(f"{path}: file not found")
    try:
        present = [entry[0] for entry in sio.whosmat(path)]
    except Exception as exc:  # scipy raises several types for a corrupt file
        raise PsearchError(f"{path}: not a readable MATLAB .mat file ({_reason(exc)})") from None
    for name in wanted:
        if name in present:
            try:
                data = sio.loadmat(path, variable_names=[name], chars_as_strings=True)
            except Exception as exc:
                raise PsearchError(
                    f"{path}: cannot read variable {name!r} ({_reason(exc)})"
                ) from None
            return name, data[name]
    expected = " or ".join(repr(n) for n in wanted)
    found = ", ".join(repr(n) for n in present) or "none"
    raise PsearchError(f"{path}: expected variable {expected}, found {found}")


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split())[:120] or type(exc).__name__


def _unwrap(value):
    """Strip 1 x 1 cells (object arrays of one element) around a value."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.flat[0]
    return value


def struct_elements(value, where: str) -> list[np.void]:
    """The scalar structs of a struct array or of a cell array of structs, in MATLAB order."""
    value = _unwrap(value)
    if isinstance(value, np.void) and value.dtype.names:
        return [value]
    if isinstance(value, np.ndarray):
        if value.dtype.names:
            return list(value.ravel(order="F"))
        if value.dtype == object:
            out: list[np.void] = []
            for item in value.ravel(order="F"):
                out.extend(struct_elements(item, where))
            return out
        if value.size == 0:  # [] where a possibly empty struct array was expected
            return []
    raise PsearchError(f"{where}: expected a struct array, got {_describe(value)}")


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} with shape {value.shape}"
    return type(value).__name__


def fields_of(rec: np.void) -> tuple[str, ...]:
    return tuple(rec.dtype.names or ())


def field(rec: np.void, name: str, where: str):
    """Field `name` of a scalar struct; a missing field is an error naming `where`."""
    names = fields_of(rec)
    if name not in names:
        raise PsearchError(
            f"{where}: missing field {name!r} (fields: {', '.join(names) or 'none'})"
        )
    return rec[name]


def optional_field(rec: np.void, name: str):
    return rec[name] if name in fields_of(rec) else None


def text(value, where: str) -> str:
    """A MATLAB char array (row, column or inside a cell) as a Python string."""
    value = _unwrap(value)
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "U":
            # A char row is one string; a char column arrives as single characters.
            return "".join(str(s) for s in value.ravel(order="F")).rstrip()
        if value.dtype.kind == "S":
            return b"".join(value.ravel(order="F")).decode("utf-8", "replace").rstrip()
        if value.dtype.kind in "iu" and value.size:  # character codes
            return "".join(chr(int(c)) for c in value.ravel(order="F"))
    raise PsearchError(f"{where}: expected a string, got {_describe(value)}")


def _numeric(value, where: str, expected: str) -> np.ndarray:
    """`value` as a float64 array, or a one-line error saying it is not `expected`."""
    value = _unwrap(value)
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PsearchError(f"{where}: expected {expected}, got {_describe(value)}") from None


def number(value, where: str) -> float:
    arr = _numeric(value, where, "a number")
    if arr.size != 1:
        raise PsearchError(f"{where}: expected one number, got {arr.size} values")
    return float(arr.reshape(-1)[0])


def flag(value, where: str) -> bool:
    """A 0/1 flag; an empty value (as some files leave ishard) counts as 0."""
    value = _unwrap(value)
    if isinstance(value, np.ndarray) and value.size == 0:
        return False
    return number(value, where) != 0


def box(value, where: str) -> tuple[float, float, float, float] | None:
    """An `[x y w h]` box as a tuple of floats; None for an empty one (1 x 0 or 0 x 0)."""
    arr = _numeric(value, where, "an [x y w h] box")
    if arr.size == 0:
        return None
    if arr.size != 4 or not np.all(np.isfinite(arr)):
        raise PsearchError(f"{where}: expected an [x y w h] box, got {arr.ravel().tolist()}")
    x, y, w, h = (float(v) for v in arr.reshape(-1))
    return (x, y, w, h)


def matrix(value, columns: int, where: str) -> np.ndarray:
    """An N x `columns` numeric matrix (N may be 0); a single row may come as a vector."""
    arr = _numeric(value, where, "a numeric matrix")
    if arr.size == 0:
        return np.zeros((0, columns))
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 1 and arr.shape[1] == columns):
        arr = arr.reshape(-1, columns) if arr.size % columns == 0 else arr
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise PsearchError(f"{where}: expected an N x {columns} matrix, got shape {arr.shape}")
    return arr


def strings(value, where: str) -> list[str]:
    """A cell array of strings (any shape), or a char matrix with one name per row."""
    value = _unwrap(value) if not (isinstance(value, np.ndarray) and value.size > 1) else value
    if isinstance(value, str):
        return [value]
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [text(v, f"{where}[{i}]") for i, v in enumerate(value.ravel(order="F"))]
        if value.dtype.kind == "U":  # a char matrix: loadmat gives one string per row
            return [str(s).rstrip() for s in value.ravel()]
    raise PsearchError(f"{where}: expected a cell array of strings, got {_describe(value)}")
