"""Train: joint detection + re-identification, initialised from the IDNet (GPU)."""

from kfp.dsl import Dataset, Input, Model, Output

IMAGE = "gpu"


def train(
    manifests: Input[Dataset],
    idnet: Input[Model],
    params_json: str,
    pipeline_run_id: str,
    model: Output[Model],
):
    """Train the joint network; `model` receives model.pt and run.json (its MLflow run)."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json, pipeline_run_id)
    summary = stages.train(Path(manifests.path), Path(model.path), cfg, init=Path(idnet.path))
    print(summary_line("train", summary))
