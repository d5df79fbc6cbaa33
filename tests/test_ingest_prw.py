"""The PRW reader on a PRW-layout fixture built from the tiny synthetic scenes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.io as sio

from psearch.cli import main
from psearch.data.ingest import ingest
from psearch.data.manifest import read_manifests
from psearch.synth.plan import plan_dataset


def _frame(i: int) -> str:
    return f"c{i % 6 + 1}s{1 + i // 50}_{i:06d}"


def _prw_id(identity: int) -> int:
    return 100 + 3 * identity  # PRW ids are sparse integers; unlabelled people are -2


def _cell(names):
    out = np.empty((len(names), 1), dtype=object)
    for k, n in enumerate(names):
        out[k, 0] = n
    return out


@pytest.fixture(scope="module")
def prw(tiny_dataset, tmp_path_factory):
    """(root, plan, frame names): every tiny scene as a PRW frame, its test queries as query_info."""
    plan = plan_dataset("tiny", 0)
    root = tmp_path_factory.mktemp("prw") / "PRW"
    (root / "frames").mkdir(parents=True)
    (root / "annotations").mkdir()
    frames = [_frame(i) for i in range(len(plan.scenes))]
    variables = ["box_new"] * len(frames)
    variables[3], variables[4] = "anno_file", "anno_previous"  # as in a few of the release's files
    for i, scene in enumerate(plan.scenes):
        shutil.copy(tiny_dataset / "Image/SSM" / scene.name, root / "frames" / f"{frames[i]}.jpg")
        rows = [
            [_prw_id(f.identity) if f and f.identity >= 0 else -2, *box]
            for box, f in scene.annotated_boxes()
        ]
        sio.savemat(
            root / "annotations" / f"{frames[i]}.jpg.mat",
            {variables[i]: np.array(rows, dtype=float).reshape(-1, 5)},
        )
    train = [frames[i] for i, s in enumerate(plan.scenes) if s.split == "train"]
    test = [frames[i] for i, s in enumerate(plan.scenes) if s.split == "test"]
    sio.savemat(root / "frame_train.mat", {"img_index_train": _cell(train)})
    sio.savemat(root / "frame_test.mat", {"img_index_test": _cell(test)})
    lines = [
        f"{_prw_id(q.identity)} {q.box[0]:.2f} {q.box[1]:.2f} {q.box[2]:.2f} {q.box[3]:.2f} {frames[q.image]}"
        for q in plan.queries
    ]
    (root / "query_info.txt").write_text("\n".join(lines) + "\n")
    return root, plan, frames


def test_prw_manifests(prw, tmp_path):
    root, plan, frames = prw
    info = ingest(root, tmp_path / "m", "prw")
    m = read_manifests(tmp_path / "m")
    order = [i for i, s in enumerate(plan.scenes) if s.split == "train"] + plan.test_scenes()
    assert m.images.column("image_name").to_pylist() == [f"{frames[i]}.jpg" for i in order]
    assert m.images.column("path").to_pylist() == [f"frames/{frames[i]}.jpg" for i in order]
    image_of_scene = {scene: k for k, scene in enumerate(order)}

    # Persons: training ids (ascending PRW id) first, then test ids; names are the PRW ids.
    expected_persons = [str(_prw_id(p)) for p in plan.train_ids] + [
        str(_prw_id(p)) for p in plan.test_ids
    ]
    assert m.persons.column("person_name").to_pylist() == expected_persons
    names = m.persons.column("person_name").to_pylist()

    boxes = m.boxes.to_pylist()
    expected = []
    for scene in order:
        for (x, y, w, h), f in plan.scenes[scene].annotated_boxes():
            if f is not None:
                expected.append(
                    (
                        image_of_scene[scene],
                        float(x),
                        float(y),
                        float(x + w),
                        float(y + h),
                        str(_prw_id(f.identity)) if f.identity >= 0 else None,
                    )
                )
    got = [
        (
            b["image_id"],
            b["x1"],
            b["y1"],
            b["x2"],
            b["y2"],
            names[b["person_id"]] if b["person_id"] >= 0 else None,
        )
        for b in boxes
    ]
    assert got == expected

    queries = m.queries.to_pylist()
    assert [names[q["person_id"]] for q in queries] == [
        str(_prw_id(q.identity)) for q in plan.queries
    ]
    assert [q["image_id"] for q in queries] == [image_of_scene[q.image] for q in plan.queries]

    # gallery_size -1: the test frames holding the person, in frame order, own frame excluded.
    rows = m.galleries.to_pylist()
    assert {r["gallery_size"] for r in rows} == {-1}
    for qi, q in enumerate(plan.queries):
        mine = [(r["image_id"], r["gt_x1"], r["gt_y2"]) for r in rows if r["query_id"] == qi]
        holding = sorted(image_of_scene[i] for i in plan.positives(qi))
        assert [img for img, _, _ in mine] == holding
        for img, x1, y2 in mine:
            box = plan.box_of(q.identity, order[img])
            assert (x1, y2) == (box[0], box[1] + box[3])
    assert info["gallery_sizes"] == [-1]
    assert info["counts"]["dropped_zero_size_boxes"] == sum(len(s.zero_size) for s in plan.scenes)
    assert "c<cam>" in info["camera"]
    assert json.loads((tmp_path / "m/dataset.json").read_text())["format"] == "prw"


def _fails(root, tmp_path, capsys, *expected):
    out = tmp_path / "outs"
    out.mkdir(exist_ok=True)
    rc = main(["ingest", "--format", "prw", "--root", str(root), "--out", str(out / "m")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err
    for text in expected:
        assert text in err, err
    assert list(out.iterdir()) == []


@pytest.fixture
def prw_copy(prw, tmp_path):
    root = tmp_path / "PRW"
    shutil.copytree(prw[0], root)
    return root, prw[2]


def test_prw_missing_annotation(prw_copy, tmp_path, capsys):
    root, frames = prw_copy
    (root / "annotations" / f"{frames[10]}.jpg.mat").unlink()
    _fails(root, tmp_path, capsys, f"{frames[10]}.jpg.mat", "file not found")


def test_prw_wrong_variable(prw_copy, tmp_path, capsys):
    root, frames = prw_copy
    sio.savemat(root / "annotations" / f"{frames[2]}.jpg.mat", {"boxes": np.zeros((1, 5))})
    _fails(root, tmp_path, capsys, f"{frames[2]}.jpg.mat", "expected variable 'box_new' or")


def test_prw_query_box_matches_nothing(prw_copy, tmp_path, capsys):
    root, _ = prw_copy
    lines = (root / "query_info.txt").read_text().splitlines()
    parts = lines[1].split()
    parts[1] = str(float(parts[1]) + 9)
    lines[1] = " ".join(parts)
    (root / "query_info.txt").write_text("\n".join(lines))
    _fails(root, tmp_path, capsys, "query_info.txt:2", "matches no annotated box")


def test_prw_duplicate_frames_and_query_file_name(prw_copy, tmp_path, capsys):
    root, _ = prw_copy
    (root / "query_info.txt").rename(root / "query_info_2057.txt")  # the other name some copies use
    train = sio.loadmat(root / "frame_train.mat")["img_index_train"]
    sio.savemat(root / "frame_test.mat", {"img_index_test": train[:3]})
    _fails(root, tmp_path, capsys, "duplicate frame name", str(train[0, 0][0]))
