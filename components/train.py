"""Train: joint detection + re-identification, initialised from the IDNet (GPU), or from the
backbone's own weights when the recipe has no pretrain stage (the DAG then passes no idnet)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Model, Output

IMAGE = "gpu"


def train(
    manifests: Input[Dataset],
    params_json: str,
    pipeline_run_id: str,
    checkpoint_root: str,
    kfp_run_id: str,
    model: Output[Model],
    idnet: Optional[Input[Model]] = None,  # noqa: UP045 (KFP reads this annotation's form)
):
    """Train the joint network; `model` receives model.pt and run.json (its MLflow run).
    Checkpoints go to `checkpoint_root` (the checkpoint PVC; "" keeps them in the pod) and a
    retry of the task resumes from them."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, train_resumably
    from psearch import stages

    cfg = stage_params(params_json, pipeline_run_id)
    init = Path(idnet.path) if idnet is not None else None
    paths = Path(manifests.path), Path(model.path)
    train_resumably(stages.train, "train", checkpoint_root, kfp_run_id, *paths, cfg, init=init)
