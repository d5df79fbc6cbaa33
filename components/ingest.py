"""Ingest: raw CUHK-SYSU / PRW dataset (on the mounted PVC) -> manifests (Parquet)."""

from kfp.dsl import Dataset, Output

IMAGE = "cpu"


def ingest(dataset_root: str, dataset_digest: str, params_json: str, manifests: Output[Dataset]):
    """Read the raw dataset at `dataset_root`; write the manifests artifact. `dataset_digest`
    (the dataset_digest task's output) is not read: it keys this task's cache on the data."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json)
    # The later tasks read the manifests at other artifact paths: the PVC's absolute path too.
    summary = stages.ingest(
        Path(dataset_root), Path(manifests.path), cfg.ingest, absolute_root=True
    )
    print(summary_line("ingest", summary))
    print(f"psearch ingest: dataset {dataset_digest}")
