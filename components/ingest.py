"""Ingest: raw CUHK-SYSU / PRW dataset (on the mounted PVC) -> manifests (Parquet)."""

from kfp.dsl import Dataset, Output

IMAGE = "cpu"


def ingest(dataset_root: str, params_json: str, manifests: Output[Dataset]):
    """Read the raw dataset at `dataset_root`; write the manifests artifact."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json)
    summary = stages.ingest(Path(dataset_root), Path(manifests.path), cfg.ingest)
    print(summary_line("ingest", summary))
