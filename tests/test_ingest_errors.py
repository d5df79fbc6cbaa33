"""Bad CUHK-SYSU input: one-line error naming the file, exit code 2, no output left behind."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.io as sio

from psearch.cli import main

TEST_DIR = "annotation/test/train_test"


@pytest.fixture
def copy(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    return root


def _ingest_fails(root, tmp_path, capsys, *expected):
    outs = tmp_path / "outs"
    outs.mkdir()
    rc = main(
        ["ingest", "--format", "cuhk-sysu", "--root", str(root), "--out", str(outs / "manifests")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert list(outs.iterdir()) == []  # neither the output nor a temporary directory is left
    return lines[0]


def _edit(path, var, change):
    data = sio.loadmat(path)[var]
    sio.savemat(path, {var: change(data)})


def test_missing_annotation_file(copy, tmp_path, capsys):
    (copy / "annotation/pool.mat").unlink()
    _ingest_fails(copy, tmp_path, capsys, "pool.mat", "file not found")


def test_unreadable_annotation_file(copy, tmp_path, capsys):
    (copy / "annotation/Images.mat").write_bytes(b"this is not a MATLAB file" * 10)
    _ingest_fails(copy, tmp_path, capsys, "Images.mat", "not a readable MATLAB")


def test_unexpected_variable(copy, tmp_path, capsys):
    path = copy / TEST_DIR / "Train.mat"
    sio.savemat(path, {"Training": sio.loadmat(path)["Train"]})
    _ingest_fails(
        copy, tmp_path, capsys, "Train.mat", "expected variable 'Train', found 'Training'"
    )


def test_unexpected_fields(copy, tmp_path, capsys):
    def rename_box_field(img):
        img.dtype.names = ("imname", "nAppear", "boxes")
        return img

    _edit(copy / "annotation/Images.mat", "Img", rename_box_field)
    _ingest_fails(copy, tmp_path, capsys, "Images.mat", "Img(1)", "missing field 'box'")


def test_referenced_image_missing(copy, tmp_path, capsys):
    (copy / "Image/SSM/s7.jpg").unlink()
    _ingest_fails(copy, tmp_path, capsys, "s7.jpg", "image not found")


def test_image_not_decodable(copy, tmp_path, capsys):
    (copy / "Image/SSM/s9.jpg").write_bytes(b"\x00garbage" * 50)
    _ingest_fails(copy, tmp_path, capsys, "s9.jpg", "not a decodable image")


def test_protocol_box_matching_no_annotated_box(copy, tmp_path, capsys):
    def shift_first_positive(test):
        gallery = test[0, 0]["Gallery"]
        gallery[0, 0]["idlocate"] = gallery[0, 0]["idlocate"] + 1.0
        return test

    _edit(copy / TEST_DIR / "TestG100.mat", "TestG100", shift_first_positive)
    message = _ingest_fails(
        copy, tmp_path, capsys, "TestG100.mat", "matches no annotated box of Images.mat"
    )
    assert "query 1" in message


def test_train_box_matching_no_annotated_box(copy, tmp_path, capsys):
    def shift(train):
        scene = train[0, 0][0, 0]["scene"]
        scene[0, 0]["idlocate"] = scene[0, 0]["idlocate"] + np.array([[0, 0, 0.5, 0]])
        return train

    _edit(copy / TEST_DIR / "Train.mat", "Train", shift)
    _ingest_fails(copy, tmp_path, capsys, "Train.mat", "matches no annotated box")


def test_protocol_files_disagree_on_queries(copy, tmp_path, capsys):
    _edit(
        copy / TEST_DIR / "TestG100.mat", "TestG100", lambda t: t[:, [1, 0, *range(2, t.shape[1])]]
    )
    _ingest_fails(
        copy, tmp_path, capsys, "TestG100.mat", "different queries from TestG50.mat", "query 1"
    )


def test_protocol_files_disagree_on_query_count(copy, tmp_path, capsys):
    _edit(copy / TEST_DIR / "TestG50.mat", "TestG50", lambda t: t[:, :-1])
    _ingest_fails(copy, tmp_path, capsys, "TestG100.mat", "different queries")


def test_duplicate_image_names(copy, tmp_path, capsys):
    def duplicate(img):
        img[0, 5]["imname"] = img[0, 4]["imname"]
        return img

    _edit(copy / "annotation/Images.mat", "Img", duplicate)
    _ingest_fails(copy, tmp_path, capsys, "Images.mat", "duplicate image name")


def test_subset_query_not_among_queries(copy, tmp_path, capsys):
    def shift(occ):
        occ[0, 0]["Query"][0, 0]["idlocate"] = occ[0, 0]["Query"][0, 0]["idlocate"] + 2.0
        return occ

    _edit(copy / "annotation/test/subset/Occlusion.mat", "Occlusion1", shift)
    _ingest_fails(copy, tmp_path, capsys, "Occlusion.mat", "matches no query")


def test_missing_root_and_protocols(copy, tmp_path, capsys):
    _ingest_fails(tmp_path / "nowhere", tmp_path, capsys, "nowhere", "dataset root not found")
    for path in (copy / TEST_DIR).glob("TestG*.mat"):
        path.unlink()
    shutil.rmtree(tmp_path / "outs")
    _ingest_fails(copy, tmp_path, capsys, "train_test", "no TestG<size>.mat")


def test_failed_ingest_keeps_previous_output(copy, tiny_manifests, tmp_path, capsys):
    out = tmp_path / "keep"
    shutil.copytree(tiny_manifests, out)
    before = sorted(p.name for p in out.iterdir())
    (copy / "annotation/pool.mat").unlink()
    assert main(["ingest", "--root", str(copy), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
