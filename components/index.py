"""Index: the gallery's nearest-neighbour index (faiss) that `psearch serve` loads (CPU)."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output

IMAGE = "cpu"


def index(
    manifests: Input[Dataset],
    detections: Input[Dataset],
    model: Input[Model],
    params_json: str,
    gallery_index: Output[Artifact],
):
    """Build the index of the merged extraction in `gallery_index` (index settings: the
    `index` params); `model` is fingerprinted so a server can tell it made these features."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json)
    summary = stages.index(
        Path(detections.path),
        Path(gallery_index.path),
        cfg,
        manifests=Path(manifests.path),
        model=str(Path(model.path)),
    )
    print(summary_line("index", summary))
