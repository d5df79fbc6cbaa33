"""psearch extract: contract files, batching that does not change results, shards + merge,
the Table 2 baselines (GT boxes, IDNet features) and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import INFERENCE_OVERRIDES, write_scene_dataset
from torchvision.io import ImageReadMode, decode_image

from psearch.cli import main
from psearch.config import load_params
from psearch.data.manifest import (
    gallery_detections_schema,
    query_features_schema,
    read_manifests,
    read_parquet,
)
from psearch.errors import PsearchError
from psearch.inference.batching import padded_size, plan_batches
from psearch.inference.extract import extract, merge


def _params(*overrides: str):
    return load_params(None, [*INFERENCE_OVERRIDES, *overrides])


def _gallery(dets: Path) -> dict:
    return pq.read_table(dets / "gallery_detections.parquet").to_pydict()


def _queries(dets: Path) -> dict:
    return pq.read_table(dets / "query_features.parquet").to_pydict()


def _assert_same_extraction(a: Path, b: Path) -> None:
    ga, gb = _gallery(a), _gallery(b)
    assert ga["image_id"] == gb["image_id"]
    for column in ("x1", "y1", "x2", "y2", "score", "feature"):
        np.testing.assert_allclose(np.array(ga[column]), np.array(gb[column]), atol=1e-4)
    qa, qb = _queries(a), _queries(b)
    assert qa["query_id"] == qb["query_id"]
    np.testing.assert_allclose(np.array(qa["feature"]), np.array(qb["feature"]), atol=1e-4)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, scene_manifests, random_models, inference_params):
    """One unsharded extraction, batch size 1 (every image alone)."""
    out = tmp_path_factory.mktemp("single") / "dets"
    params = _params("extract.batch_size=1")
    info = extract(scene_manifests, str(random_models["joint"]), out, params)
    return out, info


# ---------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("size", [(120, 160), (100, 180), (600, 800), (333, 517), (1080, 1920)])
@pytest.mark.parametrize("limits", [(96, 160), (900, 1500), (288, 480)])
def test_padded_size_is_what_the_joint_transform_pads_to(size, limits):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = GeneralizedRCNNTransform(*limits, [0.0] * 3, [1.0] * 3, size_divisible=32).eval()
    batched, _ = transform([torch.zeros(3, *size)])
    assert padded_size(*size, *limits) == tuple(batched.tensors.shape[-2:])


def test_plan_batches_groups_equal_keys_within_chunks():
    keys = ["a", "b", "a", "a", "b", "c", "a", "a"]
    plan = plan_batches(keys, batch_size=2, chunk_size=5)
    assert plan == [[[0, 2], [3], [1, 4]], [[5], [6, 7]]]
    positions = [p for chunk in plan for batch in chunk for p in batch]
    assert sorted(positions) == list(range(len(keys)))
    with pytest.raises(ValueError):
        plan_batches(keys, batch_size=0)


# ---------------------------------------------------------------------------
# the contract files


def test_gallery_writer_streams_bounded_row_groups(tmp_path, monkeypatch):
    """Rows are written out every ROW_GROUP_ROWS, so memory does not grow with the gallery."""
    from psearch.inference import writer as writer_module

    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 10)
    path = tmp_path / "g.parquet"
    with writer_module.GalleryWriter(path, dim=4) as gallery:
        for image_id in range(7):
            features = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
            gallery.add(image_id, np.ones((4, 4)), np.full(4, 0.5), features)
            assert gallery._pending_rows < 10
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_rows == 28 and parquet.metadata.num_row_groups == 3
    assert parquet.schema_arrow == gallery_detections_schema(4)


def test_extract_writes_the_contract_files(single_run, scene_manifests):
    out, info = single_run
    dim = info["feat_dim"]
    assert dim == 32
    gallery = read_parquet(out / "gallery_detections.parquet", gallery_detections_schema(dim))
    queries = read_parquet(out / "query_features.parquet", query_features_schema(dim))
    assert gallery.schema == gallery_detections_schema(dim)
    assert queries.schema == query_features_schema(dim)

    tables = read_manifests(scene_manifests)
    images = tables.images.to_pydict()
    test_ids = {i for i, s in zip(images["image_id"], images["split"], strict=True) if s == "test"}
    ids = gallery.column("image_id").to_numpy()
    assert set(ids) <= test_ids and len(set(ids)) > 1
    assert (np.diff(ids) >= 0).all(), "rows are in image_id order"
    scores = gallery.column("score").to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    features = np.array(gallery.column("feature").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-4)
    boxes = np.stack([gallery.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert queries.column("query_id").to_pylist() == [0, 1, 2]
    q_features = np.array(queries.column("feature").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(q_features, axis=1), 1.0, atol=1e-4)

    written = json.loads((out / "extraction.json").read_text())
    assert written["boxes"] == "detect" and written["features"] == "joint"
    assert written["images"] == len(test_ids) == 8
    assert written["queries"] == 3 and written["detections"] == len(ids)
    assert written["feat_dim"] == dim and "images_per_s" not in written  # no timings
    # Where the images are, relative to the extraction: the same bytes wherever it runs.
    assert (out / written["manifests"]).resolve() == scene_manifests.resolve()
    assert not list(out.parent.glob(".*tmp*")), "no temporary directory left behind"


def test_query_features_are_the_models_features_of_the_query_boxes(
    single_run, scene_manifests, random_models, inference_params
):
    from psearch.inference.loading import load_joint

    out, _ = single_run
    tables = read_manifests(scene_manifests)
    query = tables.queries.slice(1, 1).to_pylist()[0]
    image_path = tables.info["root"] + f"/Image/SSM/s{query['image_id']}.png"
    model, _ = load_joint(str(random_models["joint"]), inference_params, torch.device("cpu"))
    box = torch.tensor([[query[k] for k in ("x1", "y1", "x2", "y2")]])
    image = decode_image(image_path, mode=ImageReadMode.RGB).float() / 255
    expected = model.query_features([image], [box])[0][0].numpy()
    np.testing.assert_allclose(_queries(out)["feature"][1], expected, atol=1e-5)


def test_batching_does_not_change_results(single_run, scene_manifests, random_models, tmp_path):
    """Images of two sizes alternate; with batch size 3 they are grouped by padded size,
    so every image sees the same input as alone."""
    out = tmp_path / "dets"
    extract(scene_manifests, str(random_models["joint"]), out, _params("extract.batch_size=3"))
    _assert_same_extraction(single_run[0], out)


# ---------------------------------------------------------------------------
# shards


def test_shards_merged_equal_a_single_run(single_run, scene_manifests, random_models, tmp_path):
    out = tmp_path / "dets"
    params = _params("extract.batch_size=2")
    infos = [
        extract(scene_manifests, str(random_models["joint"]), out, params, shard=(i, 3))
        for i in (2, 0, 1)
    ]
    assert sorted(info["images"] for info in infos) == [2, 3, 3]
    assert sum(info["queries"] for info in infos) == 3
    assert sorted(p.name for p in out.iterdir()) == [f"part-00{i}-of-003" for i in range(3)]
    merged = merge([], out)
    assert merged["images"] == 8 and merged["queries"] == 3 and merged["merged_parts"] == 3
    assert "shard" not in merged
    _assert_same_extraction(single_run[0], out)

    # A re-run skips the finished part (same settings) and leaves it untouched.
    part = out / "part-001-of-003"
    before = (part / "gallery_detections.parquet").stat().st_mtime_ns
    again = extract(scene_manifests, str(random_models["joint"]), out, params, shard=(1, 3))
    assert again["skipped"] is True
    assert (part / "gallery_detections.parquet").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory, scene_manifests, random_models):
    out = tmp_path_factory.mktemp("parts") / "dets"
    for i in range(2):
        extract(scene_manifests, str(random_models["joint"]), out, _params(), shard=(i, 2))
    return out


def _copy_part(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    info = json.loads((target / "extraction.json").read_text())
    info.update(changes)
    (target / "extraction.json").write_text(json.dumps(info))
    return target


@pytest.mark.parametrize(
    "case, message",
    [
        ("gap", "missing shards 1/2"),
        ("twice", "given twice"),
        ("same index", "both are shard 0/2"),
        ("other count", "different shard counts"),
        ("other model", "parts of different extractions"),
        ("not a part", "extraction.json: file not found"),
    ],
)
def test_merge_refuses_gaps_overlaps_and_mixtures(two_parts, tmp_path, case, message):
    p0, p1 = two_parts / "part-000-of-002", two_parts / "part-001-of-002"
    copy = tmp_path / "copy"
    parts = {
        "gap": lambda: [p0],
        "twice": lambda: [p0, p1, p0],
        "same index": lambda: [p0, _copy_part(p1, copy, shard=[0, 2])],
        "other count": lambda: [p0, p1, _copy_part(p1, copy, shard=[2, 3])],
        "other model": lambda: [p0, _copy_part(p1, copy, model="other.pt")],
        "not a part": lambda: [p0, p1, tmp_path],
    }[case]()
    out = tmp_path / "merged"
    with pytest.raises(PsearchError, match=message):
        merge(parts, out)
    assert not (out / "gallery_detections.parquet").exists()
    assert not out.exists() or not any(out.iterdir()), "a refused merge writes nothing"


def test_merge_refuses_parts_sharing_an_image(two_parts, tmp_path):
    """Parts that claim distinct shards but hold the same image (e.g. a renamed copy)."""
    fake = _copy_part(two_parts / "part-000-of-002", tmp_path / "fake", shard=[1, 2])
    with pytest.raises(PsearchError, match="overlapping shards"):
        merge([two_parts / "part-000-of-002", fake], tmp_path / "merged")
    assert not (tmp_path / "merged" / "gallery_detections.parquet").exists()


# ---------------------------------------------------------------------------
# the paper's baselines


def test_gt_boxes_reproduce_the_annotations(scene_manifests, random_models, tmp_path):
    out = tmp_path / "dets"
    info = extract(scene_manifests, str(random_models["joint"]), out, _params(), boxes="gt")
    assert info["boxes"] == "gt"
    gallery = pq.read_table(out / "gallery_detections.parquet")
    tables = read_manifests(scene_manifests)
    images = tables.images.to_pydict()
    test_ids = [i for i, s in zip(images["image_id"], images["split"], strict=True) if s == "test"]
    annotated = tables.boxes.filter(
        np.isin(tables.boxes.column("image_id").to_numpy(), test_ids)
    ).sort_by([("image_id", "ascending"), ("box_id", "ascending")])
    for column in ("image_id", "x1", "y1", "x2", "y2"):
        assert gallery.column(column).to_pylist() == annotated.column(column).to_pylist()
    assert set(gallery.column("score").to_pylist()) == {1.0}
    features = np.array(gallery.column("feature").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-4)


def test_idnet_features_on_detected_boxes(single_run, scene_manifests, random_models, tmp_path):
    from psearch.imaging import cut_crops
    from psearch.models.io import load_model

    out = tmp_path / "dets"
    info = extract(
        scene_manifests,
        str(random_models["joint"]),
        out,
        _params(),
        features="idnet",
        idnet=random_models["idnet"],
    )
    assert info["features"] == "idnet" and info["idnet"] == str(random_models["idnet"])
    joint, idnet = _gallery(single_run[0]), _gallery(out)
    # The same detector's boxes, other features.
    assert joint["image_id"] == idnet["image_id"]
    np.testing.assert_allclose(np.array(joint["x1"]), np.array(idnet["x1"]), atol=1e-4)
    assert not np.allclose(np.array(joint["feature"]), np.array(idnet["feature"]), atol=1e-2)
    # Row 0's feature is the IDNet's feature of its crop (64 x 32, the checkpoint's meta).
    model, _ = load_model(random_models["idnet"])
    root = read_manifests(scene_manifests).info["root"]
    image = decode_image(f"{root}/Image/SSM/s{idnet['image_id'][0]}.png", mode=ImageReadMode.RGB)
    box = np.array([[idnet[c][0] for c in ("x1", "y1", "x2", "y2")]])
    crops = cut_crops(image, box, (64, 32), model.context)
    assert crops.shape == (1, 3, 64, 32)
    with torch.inference_mode():
        expected = model.features(crops)[0].numpy()
    np.testing.assert_allclose(idnet["feature"][0], expected, atol=1e-5)


# ---------------------------------------------------------------------------
# bad input: one-line error, exit 2, nothing written


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, the last stderr line: the error line after any progress bar)."""
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def _cli_args(manifests, model, out, *extra) -> list[str]:
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    return [
        "extract",
        "--manifests",
        str(manifests),
        "--model",
        str(model),
        "--out",
        str(out),
        *sets,
        *extra,
    ]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.feat_dim=64", "model.feat_dim=32 but the params say 64"),
        ("model.backbone=resnet50", "model.backbone='small' but the params say 'resnet50'"),
    ],
)
def test_model_that_does_not_match_the_params(
    scene_manifests, random_models, tmp_path, capsys, override, fragment
):
    out = tmp_path / "dets"
    code, err = _run_cli(
        _cli_args(scene_manifests, random_models["joint"], out, "--set", override), capsys
    )
    assert code == 2 and fragment in err and err.startswith("error: ")
    assert not out.exists()


def test_idnet_given_as_the_model_or_missing(scene_manifests, random_models, tmp_path, capsys):
    out = tmp_path / "dets"
    code, err = _run_cli(_cli_args(scene_manifests, random_models["idnet"], out), capsys)
    assert code == 2 and "is an IDNet" in err
    code, err = _run_cli(
        _cli_args(scene_manifests, random_models["joint"], out, "--features", "idnet"), capsys
    )
    assert code == 2 and "--features idnet needs --idnet" in err
    code, err = _run_cli(
        _cli_args(scene_manifests, random_models["joint"], out, "--shard", "3/3"), capsys
    )
    assert code == 2 and "--shard '3/3'" in err
    assert not out.exists()


def test_manifests_without_test_images(scene_manifests, random_models, tmp_path, capsys):
    import pyarrow as pa

    from psearch.data.manifest import write_parquet

    manifests = tmp_path / "manifests"
    shutil.copytree(scene_manifests, manifests)
    images = pq.read_table(manifests / "images.parquet")
    train_only = images.set_column(
        images.schema.get_field_index("split"), "split", pa.array(["train"] * images.num_rows)
    )
    write_parquet(train_only, manifests / "images.parquet")
    out = tmp_path / "dets"
    code, err = _run_cli(_cli_args(manifests, random_models["joint"], out), capsys)
    assert code == 2 and "images.parquet: no test images" in err
    assert not out.exists()


def test_image_that_fails_to_decode_is_named(tmp_path, random_models, capsys):
    manifests = write_scene_dataset(tmp_path / "copy")
    broken = tmp_path / "copy" / "raw" / "Image" / "SSM" / "s5.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    out = tmp_path / "dets"
    code, err = _run_cli(_cli_args(manifests, random_models["joint"], out), capsys)
    assert code == 2 and err.startswith(f"error: {broken}: cannot decode image")
    assert not out.exists() and not list(tmp_path.glob(".dets*")), "no partial output"


def test_cli_shard_and_merge(scene_manifests, random_models, tmp_path, capsys):
    out = tmp_path / "dets"
    for i in range(2):
        code = main(
            _cli_args(
                scene_manifests,
                random_models["joint"],
                out,
                "--shard",
                f"{i}/2",
                "--batch-size",
                "2",
            )
        )
        assert code == 0
    capsys.readouterr()
    assert main(["extract-merge", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 8 and summary["batch_size"] == 2
    assert read_parquet(out / "query_features.parquet").num_rows == 3
