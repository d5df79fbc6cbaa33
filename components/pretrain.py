"""Pretrain: IDNet on cropped ground-truth and background boxes (GPU)."""

from kfp.dsl import Dataset, Input, Model, Output

IMAGE = "gpu"


def pretrain(
    manifests: Input[Dataset], params_json: str, pipeline_run_id: str, idnet: Output[Model]
):
    """Train the IDNet that initialises the joint network; writes idnet.pt in `idnet`."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json, pipeline_run_id)
    summary = stages.pretrain(Path(manifests.path), Path(idnet.path), cfg)
    print(summary_line("pretrain", summary))
