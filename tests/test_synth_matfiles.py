"""The fast MAT v5 writer emits exactly what scipy.io.savemat writes for the same values."""

from __future__ import annotations

import io

import numpy as np
import scipy.io as sio

from psearch.synth import matwriter as mw

SCENE = [("imname", "O"), ("idlocate", "O"), ("ishard", "O")]


def _savemat_body(variables: dict, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    sio.savemat(buf, variables, do_compression=compress)
    return buf.getvalue()[128:]  # savemat's header holds a timestamp; compare what follows


def _gallery_numpy():
    g = np.empty((1, 3), dtype=SCENE)
    g[0, 0] = ("s1.jpg", np.array([[1.0, 2.0, 30.0, 75.5]]), 0.0)
    g[0, 1] = ("s22.jpg", np.zeros((1, 0)), 0.0)
    g[0, 2] = ("s18184.jpg", np.zeros((1, 0)), 1.0)
    return g


def _gallery_fast() -> bytes:
    return mw.struct(
        ["imname", "idlocate", "ishard"],
        [
            [mw.char("s1.jpg"), mw.double([[1, 2, 30, 75.5]]), mw.scalar(0)],
            mw.char("s22.jpg") + mw.double(np.zeros((1, 0))) + mw.scalar(0),  # pre-joined form
            [mw.char("s18184.jpg"), mw.double(np.zeros((1, 0))), mw.scalar(1)],
        ],
    )


def _body(variables: dict[str, bytes], compress: int = 0) -> bytes:
    buf = io.BytesIO()
    for name, value in variables.items():
        value = mw.rename(value, name)
        if compress:
            import zlib

            packed = zlib.compress(value)
            value = np.array([mw.MI_COMPRESSED, len(packed)], dtype="<u4").tobytes() + packed
        buf.write(value)
    return buf.getvalue()


def test_struct_cell_char_double_bytes_equal_savemat():
    g = _gallery_numpy()
    top = np.empty((1, 2), dtype=[("Query", "O"), ("Gallery", "O")])
    top[0, 0] = (g[:, :1], g)
    top[0, 1] = (g[:, 1:2], g[:, :2])
    pool = np.array([["s1.jpg"], ["s2.jpg"]], dtype=object)
    expected = _savemat_body({"TestG50": top, "pool": pool, "Img": g})

    gal = _gallery_fast()
    first = mw.struct(
        ["imname", "idlocate", "ishard"],
        [[mw.char("s1.jpg"), mw.double([[1, 2, 30, 75.5]]), mw.scalar(0)]],
    )
    second = mw.struct(
        ["imname", "idlocate", "ishard"],
        [[mw.char("s22.jpg"), mw.double(np.zeros((1, 0))), mw.scalar(0)]],
    )
    two = mw.struct(
        ["imname", "idlocate", "ishard"],
        [
            [mw.char("s1.jpg"), mw.double([[1, 2, 30, 75.5]]), mw.scalar(0)],
            [mw.char("s22.jpg"), mw.double(np.zeros((1, 0))), mw.scalar(0)],
        ],
    )
    test = mw.struct(["Query", "Gallery"], [[first, gal], [second, two]])
    pool_fast = mw.cell([mw.char("s1.jpg"), mw.char("s2.jpg")])
    assert _body({"TestG50": test, "pool": pool_fast, "Img": gal}) == expected


def test_compressed_variable_equals_savemat_compressed():
    expected = _savemat_body({"Img": _gallery_numpy()}, compress=True)
    assert _body({"Img": _gallery_fast()}, compress=6) == expected


def test_written_file_loads_back(tmp_path):
    path = tmp_path / "x.mat"
    nested = mw.struct(["idname", "scene"], [[mw.char("p7"), _gallery_fast()]], shape=(1, 1))
    mw.write_mat(path, {"Train": mw.cell([nested]), "G": _gallery_fast()}, compress=1)
    data = sio.loadmat(path)
    assert data["G"].shape == (1, 3) and data["G"][0, 2]["imname"][0] == "s18184.jpg"
    assert data["G"][0, 1]["idlocate"].shape == (1, 0)
    assert data["Train"].shape == (1, 1) and data["Train"][0, 0][0, 0]["idname"][0] == "p7"
    assert path.read_bytes()[:128] == mw.file_header()
