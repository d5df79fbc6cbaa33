"""synth -> ingest round trip: every count, box, query and gallery row is what the generator intended."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from psearch.cli import main
from psearch.data.manifest import MANIFEST_SCHEMAS, read_manifests
from psearch.data.records import low_resolution_mask
from psearch.synth.plan import low_resolution_queries, plan_dataset
from psearch.tracking import data_version


@pytest.fixture(scope="module")
def plan():
    return plan_dataset("tiny", 0)


@pytest.fixture(scope="module")
def manifests(tiny_manifests):
    return read_manifests(tiny_manifests)


def _xyxy(box):
    x, y, w, h = box
    return [float(x), float(y), float(x + w), float(y + h)]


def test_schemas_are_the_contract(tiny_manifests):
    for name, schema in MANIFEST_SCHEMAS.items():
        assert pq.read_schema(tiny_manifests / f"{name}.parquet").remove_metadata() == schema


def test_images_and_boxes(plan, manifests):
    images = manifests.images.to_pylist()
    assert [r["image_name"] for r in images] == [s.name for s in plan.scenes]
    assert [r["image_id"] for r in images] == list(range(len(plan.scenes)))
    assert [r["split"] for r in images] == [s.split for s in plan.scenes]
    assert all(r["path"] == f"Image/SSM/{r['image_name']}" for r in images)
    assert all((r["width"], r["height"]) == (200, 150) for r in images)

    names = manifests.persons.column("person_name").to_pylist()
    expected = []
    for i, scene in enumerate(plan.scenes):
        for box, fig in scene.annotated_boxes():
            if fig is None:  # zero-size boxes are dropped
                continue
            who = plan.identity_names[fig.identity] if fig.identity >= 0 else None
            expected.append((i, *_xyxy(box), who, fig.hard))
    got = [
        (
            r["image_id"],
            r["x1"],
            r["y1"],
            r["x2"],
            r["y2"],
            names[r["person_id"]] if r["person_id"] >= 0 else None,
            r["is_hard"],
        )
        for r in manifests.boxes.to_pylist()
    ]
    assert got == expected
    assert manifests.boxes.column("box_id").to_pylist() == list(range(len(expected)))


def test_persons_training_first_then_test(plan, manifests):
    persons = manifests.persons.to_pylist()
    expected = [(plan.identity_names[p], "train") for p in plan.train_ids]
    expected += [(plan.identity_names[p], "test") for p in plan.test_ids]
    assert [(r["person_name"], r["split"]) for r in persons] == expected
    assert [r["person_id"] for r in persons] == list(range(len(expected)))


def test_queries_in_protocol_order_with_subsets(plan, manifests):
    names = manifests.persons.column("person_name").to_pylist()
    rows = manifests.queries.to_pylist()
    assert [r["query_id"] for r in rows] == list(range(len(plan.queries)))
    for r, q in zip(rows, plan.queries, strict=True):
        assert names[r["person_id"]] == plan.identity_names[q.identity]
        assert r["image_id"] == q.image
        assert [r["x1"], r["y1"], r["x2"], r["y2"]] == _xyxy(q.box)
        assert r["occluded"] == q.occluded
    low = [r["query_id"] for r in rows if r["low_resolution"]]
    assert low == plan.low_resolution and len(low) == 2
    assert sum(r["occluded"] for r in rows) >= 2


def test_gallery_rows(plan, manifests):
    rows = manifests.galleries.to_pylist()
    expected = []
    for size in (50, 100):
        for qi, q in enumerate(plan.queries):
            n_pos = len(plan.positives(qi))
            for k, scene in enumerate(plan.galleries[size][qi].tolist()):
                gt = _xyxy(plan.box_of(q.identity, scene)) if k < n_pos else [None] * 4
                expected.append((size, qi, scene, *gt))
    got = [
        (
            r["gallery_size"],
            r["query_id"],
            r["image_id"],
            r["gt_x1"],
            r["gt_y1"],
            r["gt_x2"],
            r["gt_y2"],
        )
        for r in rows
    ]
    assert got == expected


def test_dataset_json(plan, tiny_manifests, manifests):
    info = json.loads((tiny_manifests / "dataset.json").read_text())
    assert info["name"] == "CUHK-SYSU" and info["format"] == "cuhk-sysu"
    counts = info["counts"]
    for table in ("images", "boxes", "persons", "queries", "galleries"):
        assert counts[table] == getattr(manifests, table).num_rows
    assert counts["dropped_zero_size_boxes"] == sum(len(s.zero_size) for s in plan.scenes) >= 2
    assert counts["labelled_boxes"] == sum(len(a) for a in plan.appearances.values())
    assert info["gallery_sizes"] == [50, 100]
    assert info["subsets"]["occlusion"]["source"] == "files"
    assert info["content_hash"].startswith("sha256:") and len(info["content_hash"]) == 71
    assert data_version(tiny_manifests) == info["content_hash"]


def test_derived_low_resolution_matches_generator_rule():
    heights = np.array([30, 10, 10, 50, 20, 10, 70, 80, 90, 11, 12, 13, 14, 15, 16.0])
    # 15 queries -> round-half-up(1.5) = 2; ties go to the lower query id.
    assert np.flatnonzero(low_resolution_mask(heights)).tolist() == [1, 2]
    assert low_resolution_queries(heights.tolist()) == [1, 2]
    assert low_resolution_mask(np.array([5.0, 6.0, 7.0, 8.0])).sum() == 0  # round(0.4) = 0


def test_cli_ingest_summary_and_hash_is_stable(tiny_dataset, tiny_manifests, tmp_path, capsys):
    out = tmp_path / "m"
    assert (
        main(["ingest", "--format", "cuhk-sysu", "--root", str(tiny_dataset), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "160 images" in printed and "2 zero-size dropped" in printed
    assert data_version(out) == data_version(tiny_manifests)
    for name in MANIFEST_SCHEMAS:
        assert pq.read_table(out / f"{name}.parquet").equals(
            pq.read_table(tiny_manifests / f"{name}.parquet")
        )
