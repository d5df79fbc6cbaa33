"""The synthetic generator: CUHK-SYSU layout and .mat shapes, determinism, scene statistics."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import yaml
from PIL import Image

from psearch.cli import main
from psearch.data.ingest import ingest
from psearch.data.manifest import read_manifests
from psearch.synth import synthesize
from psearch.synth.plan import OCCLUDED_OVER, PRESETS, plan_dataset

ANN = Path("annotation")
LAYOUT = [
    ANN / "Images.mat",
    ANN / "Person.mat",
    ANN / "pool.mat",
    ANN / "test/train_test/Train.mat",
    ANN / "test/train_test/TestG50.mat",
    ANN / "test/train_test/TestG100.mat",
    ANN / "test/subset/Occlusion.mat",
    ANN / "test/subset/Resolution.mat",
]


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tiny_layout_files_and_images(tiny_dataset):
    for rel in LAYOUT:
        assert (tiny_dataset / rel).is_file(), rel
    plan = plan_dataset("tiny", 0)
    jpgs = sorted(p.name for p in (tiny_dataset / "Image/SSM").glob("*.jpg"))
    assert jpgs == sorted(s.name for s in plan.scenes)
    with Image.open(tiny_dataset / "Image/SSM" / plan.scenes[0].name) as img:
        assert img.format == "JPEG" and img.size == (PRESETS["tiny"].width, PRESETS["tiny"].height)


def test_mat_shapes_and_field_orders_as_loadmat_returns_them(tiny_dataset):
    ann = tiny_dataset / ANN
    plan = plan_dataset("tiny", 0)
    img = sio.loadmat(ann / "Images.mat")["Img"]
    assert img.shape == (1, len(plan.scenes))
    assert img.dtype.names == ("imname", "nAppear", "box")
    first = img[0, 0]
    assert first["imname"][0] == plan.scenes[0].name
    assert first["nAppear"].dtype == np.float64 and first["box"].shape == (
        1,
        int(first["nAppear"][0, 0]),
    )
    assert first["box"].dtype.names == ("idlocate", "ishard")
    assert first["box"][0, 0]["idlocate"].shape == (1, 4)

    person = sio.loadmat(ann / "Person.mat")["Person"]
    assert person.dtype.names == ("idname", "nAppear", "scene") and person.shape[0] == 1
    assert person.shape[1] > len(plan.train_ids) + len(plan.test_ids)  # more named than used

    pool = sio.loadmat(ann / "pool.mat")["pool"]
    assert pool.shape == (PRESETS["tiny"].test_images, 1) and pool.dtype == object

    train = sio.loadmat(ann / "test/train_test/Train.mat")["Train"]
    assert train.shape == (len(plan.train_ids), 1) and train.dtype == object
    assert train[0, 0].shape == (1, 1) and train[0, 0].dtype.names == ("idname", "nAppear", "scene")
    assert train[0, 0][0, 0]["scene"].dtype.names == ("imname", "idlocate", "ishard")

    for size in (50, 100):
        test = sio.loadmat(ann / f"test/train_test/TestG{size}.mat")[f"TestG{size}"]
        assert test.shape == (1, len(plan.queries)) and test.dtype.names == ("Query", "Gallery")
        query, gallery = test[0, 0]["Query"], test[0, 0]["Gallery"]
        assert query.shape == (1, 1) and query.dtype.names == (
            "imname",
            "idlocate",
            "ishard",
            "idname",
        )
        assert gallery.shape == (1, size) and gallery.dtype.names == (
            "imname",
            "idlocate",
            "ishard",
        )
        n_pos = len(plan.positives(0))
        assert all(gallery[0, k]["idlocate"].shape == (1, 4) for k in range(n_pos))
        assert all(gallery[0, k]["idlocate"].shape == (1, 0) for k in range(n_pos, size))

    occ = sio.loadmat(ann / "test/subset/Occlusion.mat")["Occlusion1"]
    assert occ.dtype.names == ("Query", "Gallery", "occlusion")
    assert occ.shape == (1, sum(q.occluded for q in plan.queries)) and occ.shape[1] >= 2
    assert all(float(occ[0, k]["occlusion"][0, 0]) > OCCLUDED_OVER for k in range(occ.shape[1]))
    res = sio.loadmat(ann / "test/subset/Resolution.mat")["Test_Size"]
    assert res.dtype.names == ("Query", "Gallery") and res.shape == (1, len(plan.low_resolution))
    assert res[0, 0]["Gallery"].shape == (1, 100)


def test_tiny_is_fast_and_deterministic(tmp_path, tiny_dataset):
    start = time.perf_counter()
    summary = synthesize(tmp_path / "again", "tiny", 0)
    assert time.perf_counter() - start < 5.0
    assert summary["test_images"] > 100 and summary["gallery_sizes"] == [50, 100]
    assert _digest(tmp_path / "again") == _digest(tiny_dataset)
    synthesize(tmp_path / "other", "tiny", 1)
    assert _digest(tmp_path / "other") != _digest(tiny_dataset)


def test_truth_file_matches_plan(tiny_dataset):
    truth = json.loads((tiny_dataset / "synthetic_truth.json").read_text())
    plan = plan_dataset("tiny", 0)
    assert [q["image"] for q in truth["queries"]] == [
        plan.scenes[q.image].name for q in plan.queries
    ]
    assert truth["summary"]["zero_size_boxes"] >= 2


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper-scale", "paper-demo", "many-ids"])
def test_scene_statistics_make_the_task_learnable_and_hard(preset):
    plan = plan_dataset(preset, 0)
    cfg = PRESETS[preset]
    figures = [f for s in plan.scenes for f in s.figures()]
    labelled = np.array([f.box[3] for f in figures if f.identity >= 0])
    background = np.array([f.box[3] for f in figures if f.identity < 0])
    queries = np.array([q.box[3] for q in plan.queries])
    # Every image has unlabelled people; about four per image on average, as in CUHK-SYSU.
    assert all(any(f.identity < 0 for f in s.figures()) for s in plan.scenes)
    assert 3.0 < len(background) / len(plan.scenes) < 5.0
    # Heights over a wide range; queries larger on average than background people.
    assert background.min() < 0.2 * cfg.height and labelled.max() > 0.7 * cfg.height
    assert queries.mean() > background.mean() * 1.3
    assert (labelled < 0.3 * cfg.height).mean() > 0.05  # small people exist
    # Each identity appears 2+ times, never twice in one image, only in its split.
    for pid, apps in plan.appearances.items():
        scenes = [i for i, _ in apps]
        assert len(scenes) >= 2 and len(set(scenes)) == len(scenes)
        split = "train" if pid in plan.train_ids else "test"
        assert {plan.scenes[i].split for i in scenes} == {split}
    # Both subsets are populated; the occluded queries really are > 40 % covered.
    occluded = [q for q in plan.queries if q.occluded]
    assert len(occluded) >= 2 and len(plan.low_resolution) == round(len(plan.queries) * 0.1 + 1e-9)
    assert all(plan.box_of(q.identity, q.image) == q.box for q in occluded)
    # Clutter to reject is in every image.
    assert all(len(s.items) > len(s.figures()) for s in plan.scenes)


def test_presets_have_the_promised_sizes():
    tiny, demo, full = PRESETS["tiny"], PRESETS["demo"], PRESETS["full"]
    assert (
        tiny.test_images >= 110 and 10 <= tiny.train_ids <= 20 and tiny.gallery_sizes == (50, 100)
    )
    assert 100 <= demo.train_ids <= 200 and demo.test_images > 100 and demo.width == 400
    assert full.train_images + full.test_images == 18184
    assert (full.train_ids, full.test_ids) == (5532, 2900)
    assert full.gallery_sizes == (50, 100, 500, 1000, 2000, 4000)
    # psearch paper's data: Fig. 7(b) needs four galleries, Fig. 6 thousands of identities;
    # the demo keeps its own (make demo's metrics depend on it).
    paper, many = PRESETS["paper-demo"], PRESETS["many-ids"]
    assert paper.gallery_sizes == (50, 100, 200, 500) and paper.test_images > 500
    assert (paper.train_images, paper.train_ids, paper.width) == (320, 160, 400)
    assert many.train_ids >= 3000 and demo.gallery_sizes == (50, 100)


def test_paper_scale_has_cuhk_sysu_resolutions_heights_and_galleries():
    plan = plan_dataset("paper-scale", 0)
    cfg = PRESETS["paper-scale"]
    # Every listed size occurs, portrait and landscape; people stay inside their image.
    assert {(s.width, s.height) for s in plan.scenes} == {size for size, _ in cfg.image_sizes}
    assert {(s.width, s.height) for s in plan.scenes} >= {(800, 600), (600, 800), (1280, 720)}
    for s in plan.scenes:
        for f in s.figures():
            x, y, w, h = f.box
            assert x >= 0 and y >= 0 and x + w <= s.width and y + h <= s.height
    # Heights in CUHK-SYSU's annotated range, most 80-250 px, a tail past 400 px.
    heights = np.array([f.box[3] for s in plan.scenes for f in s.figures()])
    assert heights.min() >= 50 and 400 < heights.max() <= 500
    assert 0.65 < ((heights >= 80) & (heights <= 250)).mean() < 0.9
    # A 500-image gallery of other test images per query.
    assert sorted(plan.galleries) == [50, 100, 500] and len(plan.test_scenes()) > 500
    assert 250 <= len(plan.scenes) - len(plan.test_scenes()) <= 400


@pytest.mark.slow
def test_paper_scale_writes_and_ingests(tmp_path):
    summary = synthesize(tmp_path / "raw", "paper-scale", 0)
    ingest(tmp_path / "raw", tmp_path / "manifests", fmt="cuhk-sysu")
    m = read_manifests(tmp_path / "manifests")
    widths, heights = m.images.column("width").to_pylist(), m.images.column("height").to_pylist()
    sizes = set(zip(widths, heights, strict=True))
    assert sizes == {size for size, _ in PRESETS["paper-scale"].image_sizes}
    galleries = m.galleries.column("gallery_size").to_numpy()
    assert set(galleries) >= {50, 100, 500}
    assert (galleries == 500).sum() == 500 * summary["queries"]


def test_galleries_list_positives_first_then_distractors():
    plan = plan_dataset("tiny", 0)
    test = set(plan.test_scenes())
    for size, rows in plan.galleries.items():
        assert rows.shape == (len(plan.queries), size)
        for qi, q in enumerate(plan.queries):
            pos = plan.positives(qi)
            assert rows[qi, : len(pos)].tolist() == pos
            holding = {i for i, _ in plan.appearances[q.identity]}
            assert not holding & set(rows[qi, len(pos) :].tolist())
            assert set(rows[qi].tolist()) <= test and len(set(rows[qi].tolist())) == size
    assert (plan.galleries[100][:, :50] == plan.galleries[50]).all()  # nested protocols


def test_cli_synth_prints_summary_and_rejects_bad_preset(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--preset", "tiny", "--seed", "2"]) == 0
    assert "160 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(tmp_path / "e"), "--preset", "huge"])
    assert exc.value.code == 2
    assert main(["synth", "--out", str(tmp_path / "f"), "--set", "data.preset=huge"]) == 2
    assert "data.preset" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_only_the_synth_stage_depends_on_the_generator():
    """Editing the generator re-runs `synth`; later stages re-run only if data/raw changed."""
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    src_deps = {
        name: {d for d in stage.get("deps", []) if str(d).startswith("src/")}
        for name, stage in stages["stages"].items()
    }
    assert src_deps["synth"] == {"src/psearch/synth"}
    assert [n for n, deps in src_deps.items() if "src/psearch/synth" in deps] == ["synth"]
