"""Extract: gallery detections + features and query features for one shard (GPU)."""

from kfp.dsl import Dataset, Input, Model, Output

IMAGE = "gpu"


def extract(
    manifests: Input[Dataset],
    model: Input[Model],
    dataset_digest: str,
    params_json: str,
    shard_index: int,
    shard_count: int,
    detections: Output[Dataset],
):
    """Run the trained model over shard `shard_index` of `shard_count` of the test images.
    `dataset_digest` is not read: it keys this task's cache on the images it reads."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json)
    summary = stages.extract(
        Path(manifests.path),
        model.path,
        Path(detections.path),
        cfg,
        shard=(shard_index, shard_count),
    )
    print(summary_line(f"extract shard {shard_index}/{shard_count}", summary))
