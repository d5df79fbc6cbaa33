"""Honest results after faults: an extraction with no detections (a weak model) evaluates to
zeros with a warning, instead of breaking the pipeline."""

from __future__ import annotations

import json

import numpy as np
from eval_reference import fake_detections

from faults.helpers import run_cli
from psearch.data.manifest import read_manifests, write_parquet


def test_no_detections_score_zero_with_a_warning(tiny_manifests, tmp_path, capsys):
    m = read_manifests(tiny_manifests)
    dets, qfeats = fake_detections(m.images, m.boxes, m.queries, np.random.default_rng(0))
    detections = tmp_path / "dets"
    write_parquet(dets.slice(0, 0), detections / "gallery_detections.parquet")
    write_parquet(qfeats, detections / "query_features.parquet")
    (detections / "extraction.json").write_text('{"model": "test"}')
    out = tmp_path / "eval"
    argv = ["evaluate", "--manifests", str(tiny_manifests), "--detections", str(detections)]
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    assert "warning: " in err and "no detections; every metric is 0" in err
    assert "Traceback" not in err and "error" not in err
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON, real numbers
    metrics = json.loads(text)
    assert set(metrics["search"]) >= {"gallery_50", "gallery_100"}
    for protocol in metrics["search"].values():
        assert protocol["queries"] > 0
        assert protocol["mAP"] == 0 and protocol["top1"] == 0
    assert metrics["detection"]["ap"] == 0 and metrics["detection"]["recall"] == 0
