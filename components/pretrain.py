"""Pretrain: IDNet on cropped ground-truth and background boxes (GPU)."""

from kfp.dsl import Dataset, Input, Model, Output

IMAGE = "gpu"


def pretrain(
    manifests: Input[Dataset],
    params_json: str,
    pipeline_run_id: str,
    checkpoint_root: str,
    kfp_run_id: str,
    idnet: Output[Model],
):
    """Train the IDNet that initialises the joint network; writes idnet.pt in `idnet`.
    Checkpoints go to `checkpoint_root` (the checkpoint PVC; "" keeps them in the pod) and a
    retry of the task resumes from them."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, train_resumably
    from psearch import stages

    cfg = stage_params(params_json, pipeline_run_id)
    paths = Path(manifests.path), Path(idnet.path)
    train_resumably(stages.pretrain, "pretrain", checkpoint_root, kfp_run_id, *paths, cfg)
