"""psearch report: the paper's Table 2 from evaluation directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psearch.cli import main
from psearch.inference.report import report


def _run_dir(
    base: Path,
    name: str,
    boxes: str,
    features: str,
    mAP: float,
    top1: float,
    protocols=("gallery_50", "gallery_100"),
) -> Path:
    directory = base / name
    directory.mkdir()
    search = {
        p: {"mAP": mAP + 0.01 * i, "top1": top1, "top5": 0.9, "top10": 0.95, "queries": 10}
        for i, p in enumerate(protocols)
    }
    search["occlusion"] = {"mAP": 0.1, "top1": 0.1, "top5": 0.1, "top10": 0.1, "queries": 2}
    metrics = {"search": search, "detection": {"ap": 0.5, "recall": 0.75, "labeled_recall": 0.8}}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    extraction = {"boxes": boxes, "features": features, "model": f"{name}.pt", "images": 8}
    (directory / "extraction.json").write_text(json.dumps(extraction))
    return directory


def test_table2_rows_detectors_columns_reid(tmp_path):
    runs = [
        _run_dir(tmp_path, "deep_joint", "detect", "joint", 0.755, 0.787),
        _run_dir(tmp_path, "gt_joint", "gt", "joint", 0.80, 0.825),
        _run_dir(tmp_path, "deep_idnet", "detect", "idnet", 0.722, 0.75),
    ]
    text = report(runs)
    lines = text.splitlines()
    assert "gallery_100" in lines[0] and "mAP / top-1" in lines[0]
    assert lines[2] == "| Detector | Joint (ours) | IDNet |"
    # gallery_100 is the second protocol: mAP + 0.01.
    assert lines[4] == "| Deep | 76.5 / 78.7 | 73.2 / 75.0 |"
    assert lines[5] == "| GT | 81.0 / 82.5 | – |"
    assert f"| {runs[2]} | Deep | IDNet | deep_idnet.pt | gallery_100 | 73.2 | 75.0 |" in text
    for run in runs:
        assert (run / "report.md").read_text() == text


def test_first_protocol_when_gallery_100_is_absent_and_out_file(tmp_path, capsys):
    prw = _run_dir(tmp_path, "prw", "detect", "joint", 0.3, 0.7, protocols=("gallery_-1",))
    cuhk = _run_dir(tmp_path, "cuhk", "gt", "joint", 0.5, 0.6)
    out = tmp_path / "table.md"
    assert main(["report", str(prw), str(cuhk), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # capsys may hold stray output of earlier tests; the table itself must be printed whole.
    assert out.read_text() in printed
    assert "(gallery_-1, mAP / top-1 %)" in out.read_text().splitlines()[0]
    assert "| GT | 51.0 / 60.0 (gallery_100) | – |" in printed
    assert not (prw / "report.md").exists()


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("no metrics", "metrics.json: file not found"),
        ("no extraction", "extraction.json: file not found"),
        ("same cell twice", "give one run per cell"),
        ("bad mode", "boxes 'acf'"),
        ("no protocol", "no gallery protocol"),
    ],
)
def test_bad_input(tmp_path, capsys, case, fragment):
    a = _run_dir(tmp_path, "a", "detect", "joint", 0.5, 0.5)
    dirs = [a]
    if case == "no metrics":
        (a / "metrics.json").unlink()
    elif case == "no extraction":
        (a / "extraction.json").unlink()
    elif case == "same cell twice":
        dirs.append(_run_dir(tmp_path, "b", "detect", "joint", 0.6, 0.6))
    elif case == "bad mode":
        dirs = [_run_dir(tmp_path, "b", "acf", "joint", 0.6, 0.6)]
    elif case == "no protocol":
        dirs = [_run_dir(tmp_path, "b", "gt", "joint", 0.6, 0.6, protocols=())]
    code = main(["report", *map(str, dirs)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and fragment in err
    assert not any((d / "report.md").exists() for d in dirs)
