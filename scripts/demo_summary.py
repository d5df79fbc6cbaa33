"""Print what `make demo` produced: stage times, metrics, a random-feature baseline, the registry.

The baseline keeps the pipeline's detections exactly (boxes and scores) and
replaces every gallery and query feature with a seeded random unit vector, then
runs the same evaluator: the gap between the two gallery-50 mAPs is what the
learned re-id features are worth.

usage: python scripts/demo_summary.py [--root .] [--elapsed SECONDS] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURE_FILES = ("gallery_detections.parquet", "query_features.parquet")


def _random_features(table: pa.Table, rng: np.random.Generator) -> pa.Table:
    dim = table.schema.field("feature").type.list_size
    vectors = rng.standard_normal((table.num_rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    index = table.schema.get_field_index("feature")
    return table.set_column(index, table.schema.field("feature"), column)


def random_feature_baseline(manifests: Path, detections: Path, params, seed: int = 0) -> dict:
    """Metrics of the pipeline's detections with seeded random unit features in place of its own."""
    from psearch import stages

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="psearch-random-") as tmp:
        fake = Path(tmp) / "detections"
        fake.mkdir()
        for name in FEATURE_FILES:
            table = pq.read_table(Path(detections) / name)
            pq.write_table(_random_features(table, rng), fake / name)
        return stages.evaluate(Path(manifests), fake, Path(tmp) / "eval", params.evaluate)


def _row(name: str, entry: dict) -> str:
    cells = [f"{entry.get(k, 0.0):6.3f}" for k in ("mAP", "top1", "top5", "top10")]
    return f"  {name:<16}{'  '.join(cells)}  {int(entry.get('queries', 0)):7d}"


def metrics_table(metrics: dict) -> list[str]:
    lines = [f"  {'protocol':<16}{'mAP':>6}  {'top-1':>6}  {'top-5':>6}  {'top-10':>6}  queries"]
    lines += [_row(name, entry) for name, entry in metrics.get("search", {}).items()]
    det = metrics.get("detection", {})
    lines.append(
        f"  detection: AP {det.get('ap', 0):.3f}, recall {det.get('recall', 0):.3f}, "
        f"labelled recall {det.get('labeled_recall', 0):.3f}"
    )
    return lines


def stage_times(root: Path) -> tuple[dict[str, float], bool]:
    """Stage wall times of the current (or else the last finished) `dvc repro` execution."""
    from psearch.tracking import LAST_PIPELINE_RECORD, PIPELINE_RECORD, read_record, stage_seconds

    for name, finished in ((PIPELINE_RECORD, False), (LAST_PIPELINE_RECORD, True)):
        record = read_record(root / ".dvc" / "tmp" / name)
        if record is not None:
            return stage_seconds(record), finished
    return {}, False


def summary(root: Path, elapsed: float | None, seed: int) -> list[str]:
    from psearch.config import load_params

    params = load_params(root / "params.yaml")
    metrics = json.loads((root / "runs/eval/metrics.json").read_text())
    lines = ["", "== psearch demo: results"]
    if elapsed is not None:
        lines.append(f"dvc repro took {elapsed:.0f} s")
    times, _ = stage_times(root)
    if times:
        total = sum(times.values())
        cells = ", ".join(f"{name} {sec:.0f}" for name, sec in times.items())
        lines.append(f"stage times (s) of the last pipeline execution: {cells} (sum {total:.0f})")
    lines += ["", "search and detection metrics (runs/eval/metrics.json):", *metrics_table(metrics)]
    random = random_feature_baseline(
        root / "data/manifests", root / "runs/detections", params, seed
    )
    protocol = "gallery_50" if "gallery_50" in metrics["search"] else next(iter(metrics["search"]))
    lines += [
        "",
        f"{protocol} mAP: learned features {metrics['search'][protocol]['mAP']:.3f}  vs  "
        f"random unit features on the same detections {random['search'][protocol]['mAP']:.3f} "
        f"(seed {seed})",
    ]
    registry = root / "runs/registry.json"
    if registry.is_file():
        info = json.loads(registry.read_text())
        lines += [
            "",
            f"registry: {info['model_name']} version {info['version']} ({info['model_uri']})",
        ]
        if info.get("promotion"):
            lines.append(f"  promotion: {info['promotion']['decision']}")
    lines += [
        "",
        "plots: runs/eval/plots/{gallery_size,cmc,detection_pr}.png "
        "(or `dvc plots show` -> dvc_plots/index.html)",
        "MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db, then open",
        f"  {training_runs_url(root / 'mlflow.db')}",
        "  (the training-runs table: MLflow 3's UI opens experiments in its GenAI view unless",
        "  the link asks for workflowType=machine_learning; it ignores the experiment's kind tag)",
    ]
    return lines


def training_runs_url(store: Path, experiment: str = "person-search") -> str:
    """The MLflow UI's runs table of `experiment` in the model-training view (sqlite store read
    with the standard library: no mlflow import for a summary)."""
    experiment_id = "1"
    if store.is_file():
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            row = db.execute(
                "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
            ).fetchone()
        experiment_id = str(row[0]) if row else experiment_id
    return f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository")
    parser.add_argument("--elapsed", type=float, default=None, help="wall seconds of dvc repro")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    args = parser.parse_args()
    print("\n".join(summary(args.root, args.elapsed, args.seed)))


if __name__ == "__main__":
    main()
