"""Paths stay inside their roots: an annotation naming an image outside the dataset root
(`../../outside/x.jpg`, an absolute path) is a one-line error naming the entry, exit 2,
nothing written — in every ingest format."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import scipy.io as sio

from faults.helpers import assert_one_line_error, run_cli
from psearch.data.manifest import read_manifests
from psearch.data.records import inside_root

ESCAPE = "../../outside/x.jpg"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Image/SSM/s1.jpg", "Image/SSM/s1.jpg"),
        ("Image/./SSM//s1.jpg", "Image/SSM/s1.jpg"),
        ("Image\\SSM\\s1.jpg", "Image/SSM/s1.jpg"),
        ("a/../s1.jpg", "s1.jpg"),
        (ESCAPE, None),
        ("a/../../x.jpg", None),
        ("..\\x.jpg", None),
        ("/etc/passwd", None),
        ("..", None),
        (".", None),
        ("", None),
        ("s1.jpg\0.png", None),
    ],
)
def test_inside_root(raw, expected):
    assert inside_root(raw) == expected


@pytest.fixture
def outside(tmp_path, tiny_dataset):
    """A real image at tmp/outside/x.jpg, where ../../outside/x.jpg leads from data/Image."""
    (tmp_path / "outside").mkdir()
    shutil.copy(next((tiny_dataset / "Image/SSM").iterdir()), tmp_path / "outside/x.jpg")
    return tmp_path / "outside/x.jpg"


def _ingest(fmt: str, root, out, capsys, *extra: str):
    argv = ["ingest", "--format", fmt, "--root", str(root), "--out", str(out), *extra]
    return run_cli([*argv, "--set", "tracking.enabled=false"], capsys)


def test_cuhk_sysu_image_name_outside_the_root(tiny_dataset, tmp_path, outside, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    images_mat = root / "annotation/Images.mat"
    img = sio.loadmat(images_mat)["Img"]
    img[0, 3]["imname"] = np.array([ESCAPE])
    sio.savemat(images_mat, {"Img": img})
    out = tmp_path / "manifests"
    code, _, err = _ingest("cuhk-sysu", root, out, capsys)
    assert_one_line_error(code, err, "Images.mat: Img(4).imname", ESCAPE, "inside the dataset root")
    assert not out.exists()


def test_prw_frame_name_outside_the_root(tiny_dataset, tmp_path, outside, capsys):
    root = tmp_path / "prw"
    root.mkdir()
    names = np.empty((2, 1), dtype=object)
    names[0, 0], names[1, 0] = "c1s1_000001", "../../outside/x"
    sio.savemat(root / "frame_train.mat", {"img_index_train": names})
    out = tmp_path / "manifests"
    code, _, err = _ingest("prw", root, out, capsys)
    assert_one_line_error(code, err, "frame_train.mat: img_index_train(2)", "../../outside/x")
    assert not out.exists()


@pytest.mark.parametrize("image", [ESCAPE, "Image/../../outside/x.jpg", "/etc/passwd"])
def test_table_image_outside_the_root(tiny_dataset, tmp_path, outside, capsys, image):
    rows = [
        dict(image="Image/SSM/s1.jpg", x1=1, y1=1, x2=20, y2=40, person_id=0, split="train"),
        dict(image=image, x1=1, y1=1, x2=20, y2=40, person_id=1, split="test"),
    ]
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "boxes.csv")
    out = tmp_path / "manifests"
    extra = ("--annotations", str(tmp_path / "boxes.csv"))
    code, _, err = _ingest("table", tiny_dataset, out, capsys, *extra)
    assert_one_line_error(code, err, "boxes.csv: row 2, column image", "inside the dataset root")
    assert not out.exists()


def test_a_plain_dataset_still_ingests(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "manifests"
    code, _, err = _ingest("cuhk-sysu", tiny_dataset, out, capsys)
    assert code == 0, err
    paths = read_manifests(out).images.column("path").to_pylist()
    assert paths and all(inside_root(p) == p for p in paths)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_a_truncated_jpeg_is_refused_at_ingest(tiny_dataset, tmp_path, capsys, keep):
    """Only its header was read before, so training met the truncated file mid-run."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    image = root / "Image/SSM/s9.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "manifests"
    code, _, err = _ingest("cuhk-sysu", root, out, capsys)
    assert_one_line_error(code, err, "s9.jpg: not a decodable image", "truncated")
    assert not out.exists()


@pytest.mark.parametrize(
    "box, problem",
    [
        ((500, 10, 540, 90), "lies outside the 200x150 image"),
        ((-90, 10, -10, 90), "lies outside the 200x150 image"),
        ((1, 1, 1e9, 90), "is more than twice the size of the 200x150 image"),
    ],
)
def test_a_box_outside_its_image_is_refused(tiny_dataset, tmp_path, capsys, box, problem):
    x1, y1, x2, y2 = box
    rows = [
        dict(image="Image/SSM/s1.jpg", x1=1, y1=1, x2=20, y2=40, person_id=0, split="train"),
        dict(image="Image/SSM/s2.jpg", x1=x1, y1=y1, x2=x2, y2=y2, person_id=1, split="train"),
    ]
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "boxes.csv")
    out = tmp_path / "manifests"
    extra = ("--annotations", str(tmp_path / "boxes.csv"))
    code, _, err = _ingest("table", tiny_dataset, out, capsys, *extra)
    assert_one_line_error(code, err, "Image/SSM/s2.jpg: box [", problem)
    assert not out.exists()
