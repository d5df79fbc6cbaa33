"""psearch search: extraction directory vs raw folder, the picture, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import INFERENCE_OVERRIDES
from PIL import Image

from psearch.cli import main
from psearch.data.manifest import read_manifests
from psearch.errors import PsearchError
from psearch.inference.extract import extract
from psearch.inference.render import canvas_size
from psearch.inference.search import format_matches, parse_box, rank_images, search

QUERY_BOX = [12.0, 15.0, 30.0, 80.0]  # query 0: person 3 in s2.png, as x, y, w, h


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, scene_manifests, random_models, inference_params):
    """An extraction directory of the test scenes, and a folder linking the same images."""
    base = tmp_path_factory.mktemp("search")
    return extracted_gallery(scene_manifests, random_models["joint"], inference_params, base)


def extracted_gallery(manifests: Path, model: Path, params, base: Path) -> dict[str, Path]:
    """{'dets': the extraction of the test scenes by `model`, 'folder': the same images
    linked into a folder, 'query': the query scene}, under `base`."""
    extract(manifests, str(model), base / "dets", params)
    tables = read_manifests(manifests)
    root = Path(tables.info["root"])
    folder = base / "folder"
    folder.mkdir()
    for row in tables.images.to_pylist():
        if row["split"] == "test":
            (folder / row["image_name"]).symlink_to(root / row["path"])
    return {"dets": base / "dets", "folder": folder, "query": root / "Image/SSM/s2.png"}


def _search(gallery_dir, query, random_models, params, **kwargs):
    return search(str(random_models["joint"]), query, QUERY_BOX, gallery_dir, params, **kwargs)


def test_extraction_directory_and_folder_give_the_same_ranking(
    gallery, random_models, inference_params
):
    kwargs = dict(top_k=20, det_thresh=0.0)
    stored = _search(gallery["dets"], gallery["query"], random_models, inference_params, **kwargs)
    fresh = _search(gallery["folder"], gallery["query"], random_models, inference_params, **kwargs)
    assert stored["source"] == "extraction" and fresh["source"] == "folder"
    # Every other test image once (7), never the query's own image.
    assert len(stored["matches"]) == 7
    assert [Path(m["image"]).name for m in stored["matches"]] == [
        Path(m["image"]).name for m in fresh["matches"]
    ]
    assert "s2.png" not in {Path(m["image"]).name for m in stored["matches"]}
    for a, b in zip(stored["matches"], fresh["matches"], strict=True):
        np.testing.assert_allclose(a["box"], b["box"], atol=1e-2)
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-4)
    similarities = [m["similarity"] for m in stored["matches"]]
    assert similarities == sorted(similarities, reverse=True)
    assert [m["rank"] for m in stored["matches"]] == list(range(1, 8))


def test_detection_threshold_and_top_k(gallery, random_models, inference_params):
    everything = _search(
        gallery["dets"], gallery["query"], random_models, inference_params, top_k=3, det_thresh=0.0
    )
    assert len(everything["matches"]) == 3
    nothing = _search(
        gallery["dets"], gallery["query"], random_models, inference_params, det_thresh=1.01
    )
    assert nothing["matches"] == []
    assert "no detection with score >= 1.01" in format_matches(nothing)


def test_picture_is_a_png_of_the_expected_size(gallery, random_models, inference_params, tmp_path):
    out = tmp_path / "result.png"
    result = _search(
        gallery["dets"],
        gallery["query"],
        random_models,
        inference_params,
        top_k=6,
        det_thresh=0.0,
        out=out,
    )
    assert result["picture"] == str(out)
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == canvas_size(1 + 6)
        pixels = np.asarray(picture.convert("RGB"))
    # The top-1 box is drawn in green somewhere in the second tile.
    assert ((pixels[..., 1] > 180) & (pixels[..., 0] < 80) & (pixels[..., 2] < 100)).any()


def test_rank_images_keeps_each_images_best_detection():
    paths = np.array(["a", "a", "b", "c"], dtype=object)
    boxes = np.arange(16, dtype=np.float32).reshape(4, 4)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    sims = np.array([0.2, 0.9, 0.5, -0.1], np.float32)
    ranked = rank_images(paths, boxes, scores, sims, top_k=10)
    assert [(m["image"], m["similarity"]) for m in ranked] == [
        ("a", pytest.approx(0.9)),
        ("b", pytest.approx(0.5)),
        ("c", pytest.approx(-0.1)),
    ]
    assert ranked[0]["box"] == [4.0, 5.0, 6.0, 7.0] and ranked[0]["score"] == pytest.approx(0.8)


def test_cli_prints_the_ranked_matches(gallery, random_models, tmp_path, capsys):
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    out = tmp_path / "r.png"
    code = main(
        [
            "search",
            "--model",
            str(random_models["joint"]),
            "--query",
            str(gallery["query"]),
            "--box",
            "12,15,30,80",
            "--gallery",
            str(gallery["dets"]),
            "--top-k",
            "3",
            "--det-thresh",
            "0",
            "--out",
            str(out),
            *sets,
        ]
    )
    assert code == 0
    # strip(): capsys can hold stray indentation written by an earlier test's leftover thread.
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("query ") and lines[-1] == f"picture: {out}"
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"]
    assert "similarity" in lines[1] and ".png" in lines[1]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("box outside", "outside the image"),
        ("bad box", "expected X,Y,W,H"),
        ("unreadable query", "cannot read image"),
        ("empty gallery", "no gallery images"),
        ("missing gallery", "not found"),
        ("unreadable gallery image", "cannot read image"),
    ],
)
def test_bad_input(gallery, random_models, tmp_path, capsys, case, fragment):
    query, box, target = str(gallery["query"]), "12,15,30,80", str(gallery["folder"])
    if case == "box outside":
        box = "150,15,30,80"  # x + w = 180 > 160
    elif case == "bad box":
        box = "12,15,30"
    elif case == "unreadable query":
        query = str(tmp_path / "q.jpg")
        Path(query).write_bytes(b"not an image")
    elif case == "empty gallery":
        target = str(tmp_path)
    elif case == "missing gallery":
        target = str(tmp_path / "nowhere")
    elif case == "unreadable gallery image":
        (tmp_path / "broken.jpg").write_bytes(b"not an image")
        target = str(tmp_path)
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    out = tmp_path / "r.png"
    code = main(
        [
            "search",
            "--model",
            str(random_models["joint"]),
            "--query",
            query,
            "--box",
            box,
            "--gallery",
            target,
            "--out",
            str(out),
            *sets,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and fragment in err[-1]
    assert not out.exists()


def test_parse_box():
    assert parse_box("1,2,3.5,4") == [1.0, 2.0, 3.5, 4.0]
    for text in ("1,2,0,4", "a,b,c,d", "1,2,3", "1,2,3,nan"):
        with pytest.raises(PsearchError):
            parse_box(text)
