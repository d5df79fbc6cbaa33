"""`psearch evaluate` end to end: outputs, agreement with the reference, bad input, imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from eval_reference import fake_detections, reference_detection, reference_search
from test_eval_vs_reference import random_case

from psearch.cli import main
from psearch.data.manifest import read_manifests, write_parquet


def _write_detections(directory: Path, dets: pa.Table, qfeats: pa.Table) -> Path:
    write_parquet(dets, directory / "gallery_detections.parquet")
    write_parquet(qfeats, directory / "query_features.parquet")
    return directory


@pytest.fixture(scope="module")
def tiny_detections(tiny_manifests, tmp_path_factory):
    m = read_manifests(tiny_manifests)
    dets, qfeats = fake_detections(m.images, m.boxes, m.queries, np.random.default_rng(0))
    directory = _write_detections(tmp_path_factory.mktemp("dets"), dets, qfeats)
    (directory / "extraction.json").write_text('{"model": "test"}')
    return directory


def _evaluate(manifests, detections, out, *flags) -> int:
    argv = ["evaluate", "--manifests", str(manifests), "--detections", str(detections)]
    return main(argv + ["--out", str(out), *flags])


def test_cli_writes_every_output_and_matches_reference(
    tiny_manifests, tiny_detections, tmp_path, capsys
):
    out = tmp_path / "eval"
    assert _evaluate(tiny_manifests, tiny_detections, out) == 0
    printed = capsys.readouterr().out
    assert "gallery_100" in printed and "detection: AP" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["search"]) == ["gallery_50", "gallery_100", "occlusion", "low_resolution"]
    assert set(metrics["detection"]) == {"ap", "recall", "labeled_recall"}

    m = read_manifests(tiny_manifests)
    dets = pq.read_table(tiny_detections / "gallery_detections.parquet")
    qfeats = pq.read_table(tiny_detections / "query_features.parquet")
    for size in (50, 100):
        expected = reference_search(m.images, m.queries, m.galleries, dets, qfeats, size)
        got = metrics["search"][f"gallery_{size}"]
        assert got["queries"] == len(expected) == len(m.queries)
        assert got["mAP"] == pytest.approx(np.mean([e[0] for e in expected.values()]), abs=1e-9)
        for k in (1, 5, 10):
            hits = [1 <= e[1] <= k for e in expected.values()]
            assert got[f"top{k}"] == pytest.approx(np.mean(hits), abs=1e-12)
    occluded = set(pc.filter(m.queries["query_id"], m.queries["occluded"]).to_pylist())
    assert metrics["search"]["occlusion"]["queries"] == len(occluded) > 0
    expected = reference_search(m.images, m.queries, m.galleries, dets, qfeats, 100)
    occluded_ap = np.mean([expected[q][0] for q in occluded])
    assert metrics["search"]["occlusion"]["mAP"] == pytest.approx(occluded_ap, abs=1e-9)
    for key, value in reference_detection(m.images, m.boxes, dets).items():
        assert metrics["detection"][key] == pytest.approx(value, abs=1e-9)

    per_query = pq.read_table(out / "per_query.parquet")
    assert per_query.schema.names == ["query_id", "protocol", "ap", "rank", "count_gt", "count_tp"]
    assert set(per_query["protocol"].to_pylist()) == set(metrics["search"])
    g100 = per_query.filter(pc.equal(per_query["protocol"], "gallery_100")).to_pylist()
    for row in g100:
        ap, rank, count_gt, count_tp = expected[row["query_id"]]
        assert row["ap"] == pytest.approx(ap, abs=1e-9)
        assert (row["rank"] or 0, row["count_gt"], row["count_tp"]) == (rank, count_gt, count_tp)

    worst = json.loads((out / "worst_queries.json").read_text())
    assert worst["protocol"] == "gallery_100"
    aps = [q["ap"] for q in worst["queries"]]
    assert aps == sorted(aps) and aps[0] == min(e[0] for e in expected.values())
    assert all(len(q["top"]) <= 10 for q in worst["queries"])
    for plot in ("gallery_size", "cmc", "detection_pr"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 0
        assert (out / "plots" / f"{plot}.csv").read_text().count("\n") > 1
    assert json.loads((out / "extraction.json").read_text()) == {"model": "test"}


def test_gallery_sizes_flag_and_no_plots(tiny_manifests, tiny_detections, tmp_path):
    out = tmp_path / "eval"
    assert (
        _evaluate(tiny_manifests, tiny_detections, out, "--gallery-sizes", "50", "--no-plots") == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["search"]) == ["gallery_50", "occlusion", "low_resolution"]
    assert metrics["search"]["occlusion"]["queries"] > 0  # still scored on gallery 100
    assert not list((out / "plots").glob("*.png"))
    assert (out / "plots" / "cmc.csv").is_file()


def test_whole_set_cross_camera_matches_reference(tmp_path):
    manifests, dets, qfeats = random_case(seed=7, lattice=False)
    mdir = tmp_path / "manifests"
    for name in ("images", "boxes", "persons", "queries", "galleries"):
        write_parquet(getattr(manifests, name), mdir / f"{name}.parquet")
    (mdir / "dataset.json").write_text("{}")
    ddir = _write_detections(tmp_path / "dets", dets, qfeats)
    out = tmp_path / "eval"
    assert (
        _evaluate(mdir, ddir, out, "--gallery-sizes", "4,-1", "--cross-camera", "--no-plots") == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["search"]["occlusion"] == {
        "mAP": 0.0,
        "top1": 0.0,
        "top5": 0.0,
        "top10": 0.0,
        "queries": 0,
    }
    tables = (manifests.images, manifests.queries, manifests.galleries)
    expected = reference_search(*tables, dets, qfeats, -1, cross_camera=True)
    assert metrics["search"]["gallery_-1"]["queries"] == len(expected)
    assert metrics["search"]["gallery_-1"]["mAP"] == pytest.approx(
        np.mean([e[0] for e in expected.values()]), abs=1e-9
    )


def test_features_not_unit_length_warn_and_are_normalised(
    tiny_manifests, tiny_detections, tmp_path, capsys
):
    dets = pq.read_table(tiny_detections / "gallery_detections.parquet")
    qfeats = pq.read_table(tiny_detections / "query_features.parquet")
    dim = dets.schema.field("feature").type.list_size
    scaled = np.asarray(dets["feature"].combine_chunks().flatten()) * 3.0
    feature = pa.FixedSizeListArray.from_arrays(pa.array(scaled, pa.float32()), dim)
    dets = dets.set_column(dets.schema.get_field_index("feature"), "feature", feature)
    ddir = _write_detections(tmp_path / "dets", dets, qfeats)
    assert _evaluate(tiny_manifests, ddir, tmp_path / "a", "--no-plots") == 0
    assert "warning:" in capsys.readouterr().err
    assert _evaluate(tiny_manifests, tiny_detections, tmp_path / "b", "--no-plots") == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["search"]["gallery_100"]["mAP"] == pytest.approx(
        b["search"]["gallery_100"]["mAP"], abs=1e-6
    )


def _set(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    return table.set_column(
        table.schema.get_field_index(column),
        table.schema.field(column),
        pa.array(values, table.schema.field(column).type),
    )


def _bad_inputs(tiny_manifests, tiny_detections):
    m = read_manifests(tiny_manifests)
    dets = pq.read_table(tiny_detections / "gallery_detections.parquet")
    qfeats = pq.read_table(tiny_detections / "query_features.parquet")
    train_image = pc.filter(m.images["image_id"], pc.equal(m.images["split"], "train"))[0].as_py()
    nan_feature = dets["feature"].to_pylist()
    nan_feature[3] = [float("nan")] * len(nan_feature[3])  # only row 3 is used
    wrong_dim = pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(len(qfeats) * 8, np.float32)), 8
    )
    return {
        "unknown image": (_set(dets, "image_id", 0, 99999), qfeats, "image_id 99999"),
        "train image": (_set(dets, "image_id", 0, train_image), qfeats, f"image_id {train_image}"),
        "nan score": (_set(dets, "score", 2, float("nan")), qfeats, "score of row 2"),
        "nan feature": (_set(dets, "feature", 3, nan_feature[3]), qfeats, "feature of row 3"),
        "dims differ": (dets, qfeats.set_column(1, "feature", wrong_dim), "feature size 8"),
        "missing query": (dets, qfeats.slice(1), "no feature for query_id"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown image",
        "train image",
        "nan score",
        "nan feature",
        "dims differ",
        "missing query",
    ],
)
def test_bad_detections_are_one_line_errors_and_write_nothing(
    case, tiny_manifests, tiny_detections, tmp_path, capsys
):
    dets, qfeats, fragment = _bad_inputs(tiny_manifests, tiny_detections)[case]
    ddir = _write_detections(tmp_path / "dets", dets, qfeats)
    out = tmp_path / "eval"
    assert _evaluate(tiny_manifests, ddir, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not out.exists() and not list(tmp_path.glob(".eval*"))


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--gallery-sizes", "50,75"], "gallery size 75"),
        (["--cross-camera"], "has no camera number"),
        (["--det-thresh", "1.5"], "evaluate.det_thresh"),
    ],
)
def test_bad_settings_are_one_line_errors(
    flags, fragment, tiny_manifests, tiny_detections, tmp_path, capsys
):
    out = tmp_path / "eval"
    assert _evaluate(tiny_manifests, tiny_detections, out, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err, err
    assert not out.exists()


def test_evaluate_process_imports_no_heavy_stack(tiny_manifests, tiny_detections, tmp_path):
    code = (
        "import sys; from psearch.cli import main; "
        f"rc = main(['evaluate', '--manifests', {str(tiny_manifests)!r}, '--detections', "
        f"{str(tiny_detections)!r}, '--out', {str(tmp_path / 'eval')!r}, '--no-plots']); "
        "heavy = [m for m in ('torch', 'sklearn', 'mlflow', 'pandas', 'matplotlib') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_gallery_image_listed_twice_is_an_error(tiny_manifests, tiny_detections, tmp_path, capsys):
    m = read_manifests(tiny_manifests)
    mdir = tmp_path / "manifests"
    for name in ("images", "boxes", "persons", "queries"):
        write_parquet(getattr(m, name), mdir / f"{name}.parquet")
    write_parquet(
        pa.concat_tables([m.galleries, m.galleries.slice(5, 1)]), mdir / "galleries.parquet"
    )
    (mdir / "dataset.json").write_text("{}")
    assert _evaluate(mdir, tiny_detections, tmp_path / "eval") == 2
    err = capsys.readouterr().err
    assert "is listed twice for query_id" in err and not (tmp_path / "eval").exists()
