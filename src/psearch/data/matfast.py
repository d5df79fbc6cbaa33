"""A vectorised reader for the big CUHK-SYSU protocol files (TestG<size>.mat).

The release's TestG files hold 22 million gallery entries; `scipy.io.loadmat`
builds three numpy objects per entry and needs minutes and gigabytes. This
reader parses the MAT v5 stream itself: the few thousand Query / Gallery
headers with a small Python parser, the millions of gallery entries with
numpy over the raw bytes (their element tags are located in one pass and
checked to chain exactly, tag by tag, before any value is trusted).

It handles the layouts MATLAB and scipy write (plain or zlib-compressed
variables, char data as UTF-8 / UINT16 / UINT8, doubles stored as any integer
type, small data elements, 1 x 0 or 0 x 0 empties). Anything else makes it
return None and the caller falls back to the loadmat-based reader.
"""

from __future__ import annotations

import mmap
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from psearch.errors import PsearchError

MI_MATRIX, MI_COMPRESSED = 14, 15
MX_CELL, MX_STRUCT, MX_CHAR = 1, 2, 4
NUMERIC = {
    1: "<i1",
    2: "<u1",
    3: "<i2",
    4: "<u2",
    5: "<i4",
    6: "<u4",
    7: "<f4",
    9: "<f8",
    12: "<i8",
    13: "<u8",
}
CHAR_TYPES = {16: 1, 2: 1, 4: 2}  # miUTF8, miUINT8, miUINT16 -> bytes per (ASCII) character
CHUNK = 1 << 20  # gallery entries decoded at a time
LOW32, ALL64 = np.uint64(0xFFFFFFFF), np.uint64(0xFFFFFFFFFFFFFFFF)
FLAGS_TAG = np.uint64((8 << 32) | 6)  # the array-flags element that opens every matrix
DIMS_2D_TAG = np.uint64((8 << 32) | 5)  # two int32 dimensions


class Unsupported(Exception):
    """The file uses a MAT construct this reader does not handle; use loadmat instead."""


@dataclass
class FastProtocol:
    queries: list[tuple[str, tuple[float, float, float, float], str]]
    query: np.ndarray  # int32 per gallery row
    image: np.ndarray  # int32 per gallery row
    gt: np.ndarray  # float64 (n, 4), NaN rows where empty


def _pad8(n: int) -> int:
    return n + (-n % 8)


def _variable_bytes(path: Path, name: str) -> memoryview:
    """The miMATRIX element of variable `name`: decompressed, or mapped from a plain file."""
    with open(path, "rb") as fh:
        try:
            raw = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise Unsupported("empty file") from None
    view = memoryview(raw)
    if len(raw) < 128 or raw[126:128] != b"IM":
        raise Unsupported("not a little-endian MAT v5 file")
    pos = 128
    while pos + 8 <= len(raw):
        start, mdtype, nbytes = pos, _u32(view, pos), _u32(view, pos + 4)
        pos = start + 8 + (nbytes if mdtype == MI_COMPRESSED else _pad8(nbytes))
        body = view[start + 8 : start + 8 + nbytes]
        if mdtype == MI_COMPRESSED:
            if _name_of(memoryview(zlib.decompressobj().decompress(body, 4096))) == name:
                return memoryview(zlib.decompress(body))
        elif mdtype == MI_MATRIX and _name_of(view[start : start + 8 + nbytes]) == name:
            return view[start : start + 8 + nbytes]
    raise Unsupported(f"no variable {name}")


def _u32(buf, off: int) -> int:
    return int.from_bytes(buf[off : off + 4], "little")


def _element(buf, off: int) -> tuple[int, int, int, int]:
    """(type, nbytes, data offset, next offset) of a data element, small or normal."""
    tag = _u32(buf, off)
    if tag >> 16:
        return tag & 0xFFFF, tag >> 16, off + 4, off + 8
    nbytes = _u32(buf, off + 4)
    return tag, nbytes, off + 8, off + 8 + _pad8(nbytes)


def _header(buf, off: int):
    """(class, dims, name, offset after the name, end) of the miMATRIX at `off`."""
    if _u32(buf, off) != MI_MATRIX:
        raise Unsupported("expected a matrix element")
    end = off + 8 + _u32(buf, off + 4)
    _, _, flags_at, pos = _element(buf, off + 8)
    mx_class = buf[flags_at]
    dtype, nbytes, dims_at, pos = _element(buf, pos)
    if dtype != 5:
        raise Unsupported("dimensions are not int32")
    dims = tuple(int(d) for d in np.frombuffer(bytes(buf[dims_at : dims_at + nbytes]), "<i4"))
    _, nbytes, name_at, pos = _element(buf, pos)
    return (
        mx_class,
        dims,
        bytes(buf[name_at : name_at + nbytes]).decode("ascii", "replace"),
        pos,
        end,
    )


def _name_of(buf) -> str:
    try:
        return _header(buf, 0)[2]
    except (Unsupported, ValueError, IndexError):
        return ""


def _struct_fields(buf, pos: int) -> tuple[list[str], int]:
    _, _, at, pos = _element(buf, pos)
    length = _u32(buf, at)
    _, nbytes, at, pos = _element(buf, pos)
    raw = bytes(buf[at : at + nbytes])
    names = [
        raw[i : i + length].split(b"\0", 1)[0].decode("ascii") for i in range(0, nbytes, length)
    ]
    return names, pos


def parse(buf, off: int = 0):
    """A small generic decoder: struct -> list of dicts, cell -> list, char -> str, else ndarray."""
    mx_class, dims, _, pos, end = _header(buf, off)
    count = int(np.prod(dims))
    if mx_class == MX_STRUCT:
        names, pos = _struct_fields(buf, pos)
        out = []
        for _ in range(count):
            rec = {}
            for name in names:
                rec[name] = parse(buf, pos)
                pos = 8 + pos + _u32(buf, pos + 4)
            out.append(rec)
        return out
    if mx_class == MX_CELL:
        out = []
        for _ in range(count):
            out.append(parse(buf, pos))
            pos = 8 + pos + _u32(buf, pos + 4)
        return out
    if count == 0 or pos >= end:
        return "" if mx_class == MX_CHAR else np.zeros(dims)
    dtype, nbytes, at, _ = _element(buf, pos)
    raw = bytes(buf[at : at + nbytes])
    if mx_class == MX_CHAR:
        if dtype == 4:
            return raw.decode("utf-16-le")
        if dtype in (16, 2):
            return raw.decode("utf-8")
        raise Unsupported(f"char data of type {dtype}")
    if dtype not in NUMERIC or mx_class in (1, 2, 3, 5):
        raise Unsupported(f"class {mx_class} / data type {dtype}")
    return np.frombuffer(raw, NUMERIC[dtype]).astype(np.float64).reshape(dims, order="F")


def read_protocol(path: Path, var: str, image_of: dict[str, int]) -> FastProtocol | None:
    """Queries and gallery rows of one TestG file, or None when its layout needs loadmat."""
    try:
        return _read(path, var, image_of)
    except (Unsupported, ValueError, IndexError, KeyError, zlib.error):
        return None


def _text_of(value) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise Unsupported("expected a string")
    return value


def _box_of(value):
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != 4:
        raise Unsupported("query box")
    return tuple(float(v) for v in arr.reshape(-1))


def _read(path: Path, var: str, image_of: dict[str, int]) -> FastProtocol:
    buf = _variable_bytes(path, var)
    mx_class, dims, _, pos, _ = _header(buf, 0)
    if mx_class != MX_STRUCT:
        raise Unsupported("top level is not a struct array")
    fields, pos = _struct_fields(buf, pos)
    if "Query" not in fields or "Gallery" not in fields:
        raise Unsupported("fields")
    queries, bodies = [], []  # bodies: (query, first leaf offset, end offset, entries, fields)
    for qi in range(int(np.prod(dims))):
        for name in fields:
            if name == "Query":
                q = parse(buf, pos)
                q = q[0] if isinstance(q, list) and len(q) == 1 else q
                if not isinstance(q, dict):
                    raise Unsupported("Query is not a 1 x 1 struct")
                idname = _text_of(q["idname"]) if "idname" in q else ""
                queries.append((_text_of(q["imname"]), _box_of(q["idlocate"]), idname))
            elif name == "Gallery":
                g_class, g_dims, _, g_pos, g_end = _header(buf, pos)
                if g_class != MX_STRUCT:
                    raise Unsupported("Gallery is not a struct array")
                g_fields, g_pos = _struct_fields(buf, g_pos)
                bodies.append((qi, g_pos, g_end, int(np.prod(g_dims)), g_fields))
            pos = 8 + pos + _u32(buf, pos + 4)
    return _galleries(buf, queries, bodies, image_of, path, var)


def _galleries(buf, queries, bodies, image_of, path, var) -> FastProtocol:
    """Decode every gallery entry at once from the raw bytes."""
    g_fields = bodies[0][4] if bodies else ["imname", "idlocate"]
    if any(b[4] != g_fields for b in bodies) or not {"imname", "idlocate"} <= set(g_fields):
        raise Unsupported("gallery fields differ between queries")
    if len(buf) % 8:
        raise Unsupported("variable size is not a multiple of 8")
    nf = len(g_fields)
    words = np.frombuffer(buf, "<u8")
    firsts = np.array([b[1] for b in bodies], dtype=np.int64) // 8
    ends = np.array([b[2] for b in bodies], dtype=np.int64) // 8
    counts = np.array([b[3] for b in bodies], dtype=np.int64) * nf
    if not len(bodies) or np.any(counts == 0):
        raise Unsupported("empty gallery")
    leaf = _leaf_matrices(words, firsts, ends, counts)
    entries = leaf.reshape(-1, nf)
    query = np.repeat(np.array([b[0] for b in bodies], dtype=np.int32), counts // nf)
    image = np.empty(len(entries), dtype=np.int32)
    boxes = np.empty((len(entries), 4))
    names = _NameTable(image_of)
    for a in range(0, len(entries), CHUNK):  # bounded temporaries for 11.6 million entries
        rows = slice(a, a + CHUNK)
        image[rows] = names.find(
            _Leaves(words, entries[rows, g_fields.index("imname")]), a, query, path, var
        )
        boxes[rows] = _boxes(_Leaves(words, entries[rows, g_fields.index("idlocate")]))
    return FastProtocol(queries, query, image, boxes)


def _leaf_matrices(words, firsts, ends, counts) -> np.ndarray:
    """Word offsets of every element matrix inside the gallery bodies, checked to chain exactly."""
    lo, hi = int(firsts.min()), int(ends.max())
    # A matrix is a miMATRIX tag followed by the array-flags tag (miUINT32, 8 bytes).
    flags = np.flatnonzero(words[lo + 1 : hi] == FLAGS_TAG) + lo
    starts = flags[(words[flags] & LOW32) == MI_MATRIX]
    a, b = np.searchsorted(starts, firsts), np.searchsorted(starts, ends)
    if not np.array_equal(b - a, counts):
        raise Unsupported("gallery entries are not leaf matrices")
    leaf = np.concatenate([starts[i:j] for i, j in zip(a, b, strict=True)])
    nbytes = (words[leaf] >> np.uint64(32)).astype(np.int64)
    if np.any(nbytes % 8):
        raise Unsupported("matrix sizes are not padded")
    # Each leaf must end exactly where the next begins (and the last where its body ends).
    expected = np.empty_like(leaf)
    expected[:-1] = leaf[1:]
    last = np.cumsum(counts) - 1
    expected[last] = ends
    if not np.array_equal(leaf + 1 + nbytes // 8, expected) or not np.array_equal(
        leaf[last - counts + 1], firsts
    ):
        raise Unsupported("gallery entries do not chain")
    return leaf


class _Leaves:
    """Header fields of many leaf matrices (char or numeric), read in a few vector gathers."""

    def __init__(self, words: np.ndarray, at: np.ndarray) -> None:
        head = words[at[:, None] + np.arange(6)]  # tag, flags tag, flags, dims tag, dims, name tag
        if not np.all(head[:, 3] == DIMS_2D_TAG):
            raise Unsupported("leaf matrices are not 2-D")
        self.words = words
        self.d0 = (head[:, 4] & LOW32).astype(np.int64)
        self.d1 = (head[:, 4] >> np.uint64(32)).astype(np.int64)
        name_tag = head[:, 5]
        name_small = ((name_tag & LOW32) >> np.uint64(16)) != 0
        name_words = np.where(
            name_small, 0, ((name_tag >> np.uint64(32)).astype(np.int64) + 7) // 8
        )
        self.data_at = at + 6 + name_words  # word offset of the data element's tag
        present = self.data_at < at + 1 + (head[:, 0] >> np.uint64(32)).astype(np.int64) // 8
        tag = words[np.where(present, self.data_at, at)]
        low = tag & LOW32
        self.small = (low >> np.uint64(16)) != 0
        self.type = np.where(self.small, low & np.uint64(0xFFFF), low).astype(np.int64)
        nbytes = np.where(self.small, low >> np.uint64(16), tag >> np.uint64(32)).astype(np.int64)
        self.nbytes = np.where(present, nbytes, 0)
        self.small_data = tag >> np.uint64(32)  # a small element's (up to 4) data bytes

    def data_words(self, rows: np.ndarray, count: int) -> np.ndarray:
        """The first `count` data words of the given rows, bytes past each element's end zeroed."""
        out = np.zeros((len(rows), max(count, 1)), dtype=np.uint64)
        nbytes = self.nbytes[rows][:, None] - 8 * np.arange(out.shape[1])
        valid = np.clip(nbytes, 0, 8).astype(np.uint64)
        mask = np.where(
            valid >= 8,
            ALL64,
            (np.uint64(1) << (np.uint64(8) * np.minimum(valid, np.uint64(7)))) - np.uint64(1),
        )
        small = self.small[rows]
        out[small, 0] = self.small_data[rows[small]]
        big = rows[~small]
        if len(big):
            out[~small] = self.words[self.data_at[big][:, None] + 1 + np.arange(out.shape[1])]
        return out & mask


def _boxes(leaves: _Leaves) -> np.ndarray:
    """[x y w h] per entry as float64; NaN rows for empty (1 x 0, 0 x 0) boxes."""
    count = leaves.d0 * leaves.d1
    if not np.all((count == 0) | (count == 4)):
        raise Unsupported("boxes are not 4 values")
    out = np.full((len(count), 4), np.nan)
    full = np.flatnonzero(count == 4)
    for mdtype in np.unique(leaves.type[full]):
        if int(mdtype) not in NUMERIC:
            raise Unsupported(f"box data type {mdtype}")
        np_type = np.dtype(NUMERIC[int(mdtype)])
        rows = full[leaves.type[full] == mdtype]
        if not np.all(leaves.nbytes[rows] == 4 * np_type.itemsize):
            raise Unsupported("box byte count")
        raw = leaves.data_words(rows, (4 * np_type.itemsize + 7) // 8)
        out[rows] = (
            raw.view(np.uint8)[:, : 4 * np_type.itemsize].copy().view(np_type).astype(np.float64)
        )
    return out


class _NameTable:
    """Image name -> image index for gallery name leaves, by hashing their data words."""

    def __init__(self, image_of: dict[str, int]) -> None:
        self.image_of = image_of
        self.tables: dict[tuple[int, int], tuple] = {}

    def _table(self, per_char: int, width: int):
        key = (per_char, width)
        if key not in self.tables:
            names = sorted(self.image_of)
            codec = "utf-16-le" if per_char == 2 else "utf-8"
            raw = np.zeros((len(names), width * 8), dtype=np.uint8)
            for k, name in enumerate(names):
                enc = name.encode(codec)
                if len(enc) <= width * 8:
                    raw[k, : len(enc)] = np.frombuffer(enc, np.uint8)
                else:
                    raw[k, :] = 255  # longer than every name here: never matches
            words = raw.view("<u8")
            hashes = _hash(words)
            order = np.argsort(hashes)
            if np.any(np.diff(hashes[order]) == 0):
                raise Unsupported("image name hash collision")
            ids = np.array([self.image_of[n] for n in names], dtype=np.int32)
            self.tables[key] = (hashes[order], words[order], ids[order])
        return self.tables[key]

    def find(self, leaves: _Leaves, base: int, query, path, var) -> np.ndarray:
        if not np.all(leaves.d0 == 1):
            raise Unsupported("names are not char rows")
        per_char = np.zeros(len(leaves.type), dtype=np.int64)
        for mdtype, size in CHAR_TYPES.items():
            per_char[leaves.type == mdtype] = size
        if np.any(per_char == 0) or not np.array_equal(leaves.nbytes, leaves.d1 * per_char):
            raise Unsupported("char encoding")
        out = np.empty(len(per_char), dtype=np.int32)
        for size in np.unique(per_char):
            rows = np.flatnonzero(per_char == size)
            width = max(1, int((leaves.nbytes[rows].max() + 7) // 8))
            words = leaves.data_words(rows, width)
            hashes, table_words, ids = self._table(int(size), width)
            pos = np.minimum(np.searchsorted(hashes, _hash(words)), len(hashes) - 1)
            found = np.all(table_words[pos] == words, axis=1)
            if not found.all():
                row = int(rows[np.flatnonzero(~found)[0]])
                self._missing(
                    words[np.flatnonzero(rows == row)[0]], int(size), base + row, query, path, var
                )
            out[rows] = ids[pos]
        return out

    @staticmethod
    def _missing(words, per_char, row, query, path, var):
        qi = int(query[row])
        k = row - int(np.searchsorted(query, qi))
        name = (
            words.view(np.uint8)
            .tobytes()
            .decode("utf-16-le" if per_char == 2 else "utf-8", "replace")
            .rstrip("\0")
        )
        raise PsearchError(
            f"{path}: {var}({qi + 1}).Gallery({k + 1}): gallery image {name} is not in Images.mat"
        )


def _hash(words: np.ndarray) -> np.ndarray:
    h = np.zeros(len(words), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(words.shape[1]):
            h = h * np.uint64(0x9E3779B97F4A7C15) + words[:, k]
    return h
