"""The stage functions: the one place the CLI, DVC and Kubeflow all call.

Each takes input paths, output paths and typed params, and nothing else; each
writes its outputs atomically and returns a small summary. Heavy modules are
imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psearch.config import DataConfig, EvaluateConfig, IngestConfig, Params


def synth(out: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write a synthetic dataset in the CUHK-SYSU layout to `out`."""
    from psearch.data.synthetic import synthesize

    return synthesize(Path(out), preset=cfg.preset, seed=cfg.seed)


def ingest(root: Path, out: Path, cfg: IngestConfig) -> dict[str, Any]:
    """Read a raw CUHK-SYSU or PRW dataset, or a table of boxes, at `root`; write the
    manifests to `out`."""
    from psearch.data.ingest import ingest as run
    from psearch.data.table import TableOptions

    table = None
    if cfg.format == "table" and cfg.annotations:
        table = TableOptions(
            annotations=Path(cfg.annotations),
            queries=Path(cfg.queries) if cfg.queries else None,
            box_format=cfg.box_format,
            gallery_sizes=tuple(cfg.gallery_sizes),
            seed=cfg.seed,
        )
    return run(Path(root), Path(out), fmt=cfg.format, table=table)


def pretrain(manifests: Path, out: Path, params: Params, resume: bool = False) -> dict[str, Any]:
    """IDNet pretraining on cropped boxes; writes `out/idnet.pt`."""
    from psearch.train.pretrain import pretrain as run

    return run(Path(manifests), Path(out), params, resume=resume)


def train(
    manifests: Path,
    out: Path,
    params: Params,
    init: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Joint detection + re-id training; writes `out/model.pt` (and logs it to MLflow)."""
    from psearch.train.joint import train as run

    return run(Path(manifests), Path(out), params, init=Path(init) if init else None, resume=resume)


def extract(
    manifests: Path,
    model: str,
    out: Path,
    params: Params,
    shard: tuple[int, int] | None = None,
    boxes: str = "detect",
    features: str = "joint",
    idnet: Path | None = None,
) -> dict[str, Any]:
    """Gallery detections + features and query features (CONTRACT.md) for a model."""
    from psearch.inference.extract import extract as run

    return run(
        Path(manifests),
        model,
        Path(out),
        params,
        shard=shard,
        boxes=boxes,
        features=features,
        idnet=Path(idnet) if idnet else None,
    )


def extract_merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """Combine extraction shards into the contract files; refuses gaps and overlaps."""
    from psearch.inference.extract import merge

    return merge([Path(p) for p in parts], Path(out))


def evaluate(manifests: Path, detections: Path, out: Path, cfg: EvaluateConfig) -> dict[str, Any]:
    """Score detections and features; writes `out/metrics.json`, per-query results, plots."""
    from psearch.evaluation.run import evaluate as run

    return run(Path(manifests), Path(detections), Path(out), cfg)


def register(model: Path, metrics: Path, params: Params) -> dict[str, Any]:
    """Register a trained model as a new version in the MLflow registry."""
    from psearch.registry import register as run

    return run(Path(model), Path(metrics), params)


def promote(
    params: Params,
    metric: str | None = None,
    force: bool = False,
    rollback: bool = False,
    version: str | None = None,
) -> dict[str, Any]:
    """Move the champion alias to the candidate when it beats the champion (or roll back)."""
    from psearch.registry import promote as run

    return run(params, metric=metric, force=force, rollback=rollback, version=version)
