"""The loadmat accessor layer, and CUHK-SYSU files written by another tool (scipy.io.savemat,
other shapes and field orders) ingesting to exactly the same manifests."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io as sio

from psearch.data import matfiles as mf
from psearch.data.ingest import ingest
from psearch.data.manifest import MANIFEST_SCHEMAS
from psearch.errors import PsearchError


def _roundtrip(tmp_path, value, **kwargs):
    path = tmp_path / "v.mat"
    sio.savemat(path, {"v": value}, **kwargs)
    return mf.load_variable(path, "v")[1]


def _structs(shape, rows):
    arr = np.empty(shape, dtype=[("imname", "O"), ("idlocate", "O")])
    for k, row in enumerate(rows):
        arr.flat[k] = row
    return arr


@pytest.mark.parametrize("shape", [(1, 3), (3, 1)])
def test_struct_arrays_either_orientation(tmp_path, shape):
    rows = [
        ("s1.jpg", np.array([[1.0, 2, 3, 4]])),
        ("s2.jpg", np.zeros((1, 0))),
        ("s3.jpg", np.zeros((0, 0))),
    ]
    value = _roundtrip(tmp_path, _structs(shape, rows))
    recs = mf.struct_elements(value, "v")
    assert [mf.text(r["imname"], "x") for r in recs] == ["s1.jpg", "s2.jpg", "s3.jpg"]
    assert [mf.box(r["idlocate"], "x") for r in recs] == [(1.0, 2.0, 3.0, 4.0), None, None]


def test_cell_of_one_by_one_structs_equals_struct_array(tmp_path):
    rows = [("s1.jpg", np.array([[1.0, 2, 3, 4]])), ("s2.jpg", np.zeros((1, 0)))]
    cells = np.empty((2, 1), dtype=object)
    for k, row in enumerate(rows):
        cells[k, 0] = _structs((1, 1), [row])
    from_cells = mf.struct_elements(_roundtrip(tmp_path, cells), "v")
    assert [mf.text(r["imname"], "x") for r in from_cells] == ["s1.jpg", "s2.jpg"]


def test_scalars_boxes_and_strings_in_other_encodings(tmp_path):
    value = _roundtrip(
        tmp_path, np.array([[1], [2], [3], [4]], dtype=np.uint16)
    )  # 4 x 1, integer class
    assert mf.box(value, "x") == (1.0, 2.0, 3.0, 4.0)
    assert mf.text(_roundtrip(tmp_path, np.array(list("s12.jpg")).reshape(-1, 1)), "x") == "s12.jpg"
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = "p9"
    assert mf.text(_roundtrip(tmp_path, cell), "x") == "p9"
    assert mf.strings(_roundtrip(tmp_path, np.array([["a.jpg", "b.jpg"]], dtype=object)), "x") == [
        "a.jpg",
        "b.jpg",
    ]
    assert mf.strings(
        _roundtrip(tmp_path, np.array([["a.jpg"], ["b.jpg"]], dtype=object)), "x"
    ) == ["a.jpg", "b.jpg"]
    assert mf.flag(_roundtrip(tmp_path, np.array([[True]])), "x") is True
    assert mf.matrix(_roundtrip(tmp_path, np.array([1.0, 2, 3, 4, 5])), 5, "x").shape == (1, 5)
    assert mf.matrix(_roundtrip(tmp_path, np.zeros((0, 0))), 5, "x").shape == (0, 5)


def test_accessor_errors_name_the_place(tmp_path):
    rec = mf.struct_elements(
        _roundtrip(tmp_path, _structs((1, 1), [("s1.jpg", np.ones((1, 3)))])), "v"
    )[0]
    with pytest.raises(
        PsearchError, match=r"F\.mat: Img\(1\): missing field 'box' \(fields: imname, idlocate\)"
    ):
        mf.field(rec, "box", "F.mat: Img(1)")
    with pytest.raises(PsearchError, match=r"where: expected an \[x y w h\] box"):
        mf.box(rec["idlocate"], "where")
    with pytest.raises(PsearchError, match="expected a struct array"):
        mf.struct_elements(np.ones((2, 2)), "where")
    path = tmp_path / "v.mat"
    with pytest.raises(PsearchError, match=r"v\.mat: expected variable 'Img', found 'v'"):
        mf.load_variable(path, "Img")


# ---------------------------------------------------------------------------
# A CUHK-SYSU copy as another tool might write it.


def _cell(items, shape):
    out = np.empty(shape, dtype=object)
    for k, item in enumerate(items):
        out.flat[k] = item
    return out


def _char_column(text):
    return np.array(list(text)).reshape(-1, 1)


def _rewrite_images(path):
    img = sio.loadmat(path)["Img"]
    out = np.empty((img.shape[1], 1), dtype=[("box", "O"), ("imname", "O"), ("nAppear", "O")])
    for i in range(img.shape[1]):
        rec = img[0, i]
        boxes = rec["box"]
        new = np.empty((boxes.shape[1], 1), dtype=[("ishard", "O"), ("idlocate", "O")])
        for k in range(boxes.shape[1]):
            b = boxes[0, k]
            # Integer-valued doubles stored as a 4 x 1 int column; ishard as a logical.
            new[k, 0] = (
                np.array([[bool(b["ishard"][0, 0])]]),
                b["idlocate"].reshape(4, 1).astype(np.int32),
            )
        out[i, 0] = (new, _cell([str(rec["imname"][0])], (1, 1)), rec["nAppear"])
    sio.savemat(path, {"Img": out}, do_compression=True)


def _rewrite_train(path):
    train = sio.loadmat(path)["Train"]
    out = np.empty((1, train.shape[0]), dtype=[("idname", "O"), ("nAppear", "O"), ("scene", "O")])
    for k in range(train.shape[0]):
        rec = train[k, 0][0, 0]
        out[0, k] = (_char_column(str(rec["idname"][0])), rec["nAppear"], rec["scene"].T)
    sio.savemat(path, {"Train": out})


def _rewrite_protocol(path, var):
    test = sio.loadmat(path)[var]
    fields = [("Gallery", "O"), ("Query", "O")] + [
        (f, "O") for f in test.dtype.names if f not in ("Query", "Gallery")
    ]
    out = np.empty((test.shape[1], 1), dtype=fields)
    for k in range(test.shape[1]):
        rec = test[0, k]
        gallery = rec["Gallery"].copy()
        for j in range(gallery.shape[1]):
            if gallery[0, j]["idlocate"].size == 0:
                gallery[0, j]["idlocate"] = np.zeros((0, 0))  # 0 x 0 empties
        extra = tuple(rec[f] for f in test.dtype.names if f not in ("Query", "Gallery"))
        out[k, 0] = (gallery, _cell([rec["Query"]], (1, 1)), *extra)
    sio.savemat(path, {var: out}, do_compression=True)


def test_files_from_another_tool_ingest_identically(tiny_dataset, tiny_manifests, tmp_path):
    root = tmp_path / "other"
    shutil.copytree(tiny_dataset, root)
    ann = root / "annotation"
    _rewrite_images(ann / "Images.mat")
    pool = sio.loadmat(ann / "pool.mat")["pool"]
    sio.savemat(ann / "pool.mat", {"pool": pool.T})  # 1 x N instead of N x 1
    _rewrite_train(ann / "test/train_test/Train.mat")
    for size in (50, 100):
        _rewrite_protocol(ann / f"test/train_test/TestG{size}.mat", f"TestG{size}")
    _rewrite_protocol(ann / "test/subset/Occlusion.mat", "Occlusion1")
    _rewrite_protocol(ann / "test/subset/Resolution.mat", "Test_Size")
    (ann / "Person.mat").unlink()  # readers need not use it

    # Query wrapped in a cell is beyond the vectorised reader: this exercises the loadmat path.
    from psearch.data import matfast

    assert matfast.read_protocol(ann / "test/train_test/TestG50.mat", "TestG50", {}) is None
    out = tmp_path / "m"
    info = ingest(root, out, "cuhk-sysu")
    for name in MANIFEST_SCHEMAS:
        assert pq.read_table(out / f"{name}.parquet").equals(
            pq.read_table(tiny_manifests / f"{name}.parquet")
        ), name
    assert info["counts"]["dropped_zero_size_boxes"] >= 2


def test_trimmed_copy_without_subset_files_derives_low_resolution(
    tiny_dataset, tiny_manifests, tmp_path
):
    root = tmp_path / "trimmed"
    shutil.copytree(tiny_dataset, root)
    shutil.rmtree(root / "annotation/test/subset")
    info = ingest(root, tmp_path / "m", "cuhk-sysu")
    assert info["subsets"]["occlusion"]["queries"] == 0
    assert "empty" in info["subsets"]["occlusion"]["source"]
    assert info["subsets"]["low_resolution"]["source"].startswith("derived")
    derived = pq.read_table(tmp_path / "m/queries.parquet").column("low_resolution")
    assert derived.equals(
        pq.read_table(tiny_manifests / "queries.parquet").column("low_resolution")
    )


# ---------------------------------------------------------------------------
# The vectorised TestG reader agrees with the loadmat reader on every encoding.


def _protocol(box_dtype, empty_shape, box_shape=(1, 4)):
    rng = np.random.default_rng(0)
    names = [f"s{k}.jpg" for k in range(1, 400, 7)]
    test = np.empty((1, 6), dtype=[("Query", "O"), ("Gallery", "O")])
    for q in range(6):
        query = np.empty(
            (1, 1), dtype=[("imname", "O"), ("idlocate", "O"), ("ishard", "O"), ("idname", "O")]
        )
        query[0, 0] = (names[q], np.array([[q, 2.0, 30, 70]]), 0.0, f"p{q}")
        gallery = np.empty((1, 20), dtype=[("imname", "O"), ("idlocate", "O"), ("ishard", "O")])
        for k in range(20):
            box = (
                rng.integers(0, 200, size=4).astype(box_dtype).reshape(box_shape)
                if k < 3
                else np.zeros(empty_shape)
            )
            gallery[0, k] = (names[(q * 5 + k) % len(names)], box, 0.0)
        test[0, q] = (query, gallery)
    return test, {n: i for i, n in enumerate(names)}


@pytest.mark.parametrize(
    "box_dtype,empty_shape,box_shape,compress",
    [
        (np.float64, (1, 0), (1, 4), False),
        (np.float64, (0, 0), (4, 1), True),
        (np.uint8, (1, 0), (1, 4), False),  # 4 bytes: a "small data element"
        (np.int16, (0, 0), (1, 4), True),
    ],
)
def test_fast_protocol_reader_equals_loadmat(tmp_path, box_dtype, empty_shape, box_shape, compress):
    from psearch.data import matfast
    from psearch.data.cuhk_sysu import read_protocol_loadmat

    test, image_of = _protocol(box_dtype, empty_shape, box_shape)
    path = tmp_path / "TestG20.mat"
    sio.savemat(path, {"Other": np.ones((2, 2)), "TestG20": test}, do_compression=compress)
    fast = matfast.read_protocol(path, "TestG20", image_of)
    assert fast is not None
    queries, slow = read_protocol_loadmat(path, "TestG20", 20, image_of)
    assert fast.queries == queries
    assert np.array_equal(fast.query, slow.query) and np.array_equal(fast.image, slow.image)
    assert np.array_equal(fast.gt, slow.gt, equal_nan=True)
    assert np.isnan(fast.gt[3:20]).all() and not np.isnan(fast.gt[:3]).any()


def test_fast_protocol_reader_reads_uint16_chars_and_names_unknown_images(tmp_path):
    from psearch.data import matfast
    from psearch.synth import matwriter as mw

    def char16(text):  # MATLAB's own char encoding (scipy writes UTF-8)
        return mw._matrix(mw.MX_CHAR, (1, len(text)), mw._element(4, text.encode("utf-16-le")))

    entries = [
        [char16("s1.jpg"), mw.double([[1, 2, 3, 4]]), mw.scalar(0)],
        [char16("s22.jpg"), mw.double(np.zeros((1, 0))), mw.scalar(0)],
    ]
    fields = ["imname", "idlocate", "ishard"]
    query = mw.struct(
        [*fields, "idname"],
        [[char16("s3.jpg"), mw.double([[5, 6, 7, 8]]), mw.scalar(0), char16("p1")]],
        shape=(1, 1),
    )
    value = mw.struct(["Query", "Gallery"], [[query, mw.struct(fields, entries)]])
    path = tmp_path / "TestG2.mat"
    mw.write_mat(path, {"TestG2": value})
    fast = matfast.read_protocol(path, "TestG2", {"s1.jpg": 0, "s22.jpg": 1, "s3.jpg": 2})
    assert fast.queries == [("s3.jpg", (5.0, 6.0, 7.0, 8.0), "p1")]
    assert fast.image.tolist() == [0, 1] and fast.gt[0].tolist() == [1, 2, 3, 4]
    with pytest.raises(
        PsearchError,
        match=r"TestG2\.mat: TestG2\(1\)\.Gallery\(2\): gallery image s22\.jpg is not in Images\.mat",
    ):
        matfast.read_protocol(path, "TestG2", {"s1.jpg": 0, "s3.jpg": 2})


def test_synthetic_protocol_files_take_the_vectorised_path(tiny_dataset, tiny_manifests):
    from psearch.data import matfast

    names = pq.read_table(tiny_manifests / "images.parquet").column("image_name").to_pylist()
    fast = matfast.read_protocol(
        tiny_dataset / "annotation/test/train_test/TestG100.mat",
        "TestG100",
        {n: i for i, n in enumerate(names)},
    )
    assert fast is not None and len(fast.query) == 100 * len(fast.queries)
