"""A small, fast MATLAB v5 writer for the values CUHK-SYSU uses: chars, doubles, structs, cells.

It emits the same bytes as `scipy.io.savemat` (uncompressed) for these values
(tests/test_synth_matfiles.py checks that), but builds every element once as a
`bytes` block, so the full preset's 22 million gallery entries are written in
seconds rather than the half hour savemat needs. The file header carries a
fixed text instead of savemat's timestamp, so the same seed gives the same bytes.

Values are described by the helpers below and nested freely:
`char("s1.jpg")`, `double([[1, 2, 3, 4]])`, `struct(["a", "b"], [[va, vb], ...])`,
`cell([v1, v2], shape=(2, 1))`.
"""

from __future__ import annotations

import struct as _struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from psearch.atomic import atomic_file

MI_INT8, MI_INT32, MI_UINT32, MI_DOUBLE, MI_MATRIX, MI_COMPRESSED, MI_UTF8 = 1, 5, 6, 9, 14, 15, 16
MX_CELL, MX_STRUCT, MX_CHAR, MX_DOUBLE = 1, 2, 4, 6
HEADER_TEXT = b"MATLAB 5.0 MAT-file, Platform: posix, written by psearch synth"


def _pad8(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def _element(mdtype: int, data: bytes) -> bytes:
    return _struct.pack("<II", mdtype, len(data)) + _pad8(data)


def _name_element(name: str) -> bytes:
    raw = name.encode("ascii")
    if 0 < len(raw) <= 4:  # savemat packs short names into the tag ("small data element")
        return _struct.pack("<HH", MI_INT8, len(raw)) + raw.ljust(4, b"\0")
    return _element(MI_INT8, raw)


def _matrix(mx_class: int, shape: Sequence[int], body: bytes, name: str = "") -> bytes:
    flags = _struct.pack("<IIII", MI_UINT32, 8, mx_class, 0)
    dims = _element(MI_INT32, np.asarray(shape, dtype="<i4").tobytes())
    payload = flags + dims + _name_element(name) + body
    return _struct.pack("<II", MI_MATRIX, len(payload)) + payload


def char(text: str, name: str = "") -> bytes:
    """A 1 x N char array (savemat writes chars as UTF-8)."""
    raw = text.encode("utf-8")
    return _matrix(MX_CHAR, (1, len(text)), _element(MI_UTF8, raw), name)


def double(values, name: str = "") -> bytes:
    """A double matrix of the given (2-D) shape; `np.zeros((1, 0))` is the 1 x 0 empty box."""
    arr = np.asarray(values, dtype="<f8")
    if arr.ndim != 2:
        arr = arr.reshape(1, -1) if arr.ndim < 2 else arr
    return _matrix(MX_DOUBLE, arr.shape, _element(MI_DOUBLE, arr.tobytes(order="F")), name)


def scalar(value: float, name: str = "") -> bytes:
    return double([[float(value)]], name)


def struct(
    fields: Sequence[str],
    elements: Sequence[Sequence[bytes] | bytes],
    shape: Sequence[int] | None = None,
    name: str = "",
) -> bytes:
    """A struct array; `elements[i][j]` is field j of element i (MATLAB linear order).

    An element may also be given as one `bytes` block, its fields already joined
    in order (the fast path for millions of gallery entries).
    """
    return b"".join(struct_parts(fields, elements, shape, name))


def struct_parts(
    fields: Sequence[str],
    elements: Sequence[Sequence[bytes] | bytes],
    shape: Sequence[int] | None = None,
    name: str = "",
) -> list[bytes]:
    """`struct` as a list of blocks, for `write_mat` to stream a multi-gigabyte variable."""
    shape = tuple(shape) if shape is not None else (1, len(elements))
    if int(np.prod(shape)) != len(elements):
        raise ValueError(f"struct shape {shape} does not hold {len(elements)} elements")
    length = max(len(f) for f in fields) + 1
    names = b"".join(f.encode("ascii").ljust(length, b"\0") for f in fields)
    header = _struct.pack("<HHi", MI_INT32, 4, length) + _element(MI_INT8, names)
    body = []
    for values in elements:
        if not isinstance(values, bytes) and len(values) != len(fields):
            raise ValueError(f"struct element has {len(values)} values for {len(fields)} fields")
        body.extend([values] if isinstance(values, bytes) else values)
    size = len(header) + sum(len(b) for b in body)
    head = _matrix(MX_STRUCT, shape, b"", name)
    # _matrix sized the payload without the body; patch in the real size.
    head = _struct.pack("<II", MI_MATRIX, len(head) - 8 + size) + head[8:]
    return [head, header, *body]


def cell(items: Sequence[bytes], shape: Sequence[int] | None = None, name: str = "") -> bytes:
    """A cell array of already-encoded values (default shape N x 1, as pool.mat and Train.mat)."""
    shape = tuple(shape) if shape is not None else (len(items), 1)
    return _matrix(MX_CELL, shape, b"".join(items), name)


def rename(value: bytes, name: str) -> bytes:
    """Re-encode a top-level value (written with an empty name) under a variable name."""
    mdtype, _ = _struct.unpack_from("<II", value, 0)
    assert mdtype == MI_MATRIX
    flags_and_dims_end = 8 + 16
    dims_len = _struct.unpack_from("<II", value, flags_and_dims_end)[1]
    name_at = flags_and_dims_end + 8 + dims_len + (-dims_len % 8)
    old_name_len = 8  # an empty name is always a full 8-byte tag
    payload = value[8:name_at] + _name_element(name) + value[name_at + old_name_len :]
    return _struct.pack("<II", MI_MATRIX, len(payload)) + payload


def file_header() -> bytes:
    return HEADER_TEXT.ljust(116, b"\0") + b"\0" * 8 + _struct.pack("<H", 0x0100) + b"IM"


def write_mat(
    path: str | Path, variables: dict[str, bytes | list[bytes]], compress: int = 0
) -> None:
    """Write a MAT v5 file atomically; `variables` maps names to values built above.

    A value may be a list of blocks from `struct_parts(..., name=<the variable name>)`,
    written piece by piece. `compress` > 0 stores each variable zlib-compressed at that
    level (a miCOMPRESSED element, as MATLAB's own `save` does); 0 writes it plain.
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(file_header())
        for name, value in variables.items():
            parts = value if isinstance(value, list) else [rename(value, name)]
            if not compress:
                fh.writelines(parts)
                continue
            packer = zlib.compressobj(compress)
            packed = [packer.compress(p) for p in parts] + [packer.flush()]
            fh.write(_struct.pack("<II", MI_COMPRESSED, sum(len(p) for p in packed)))
            fh.writelines(packed)
