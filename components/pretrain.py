"""Pretrain: IDNet on cropped ground-truth and background boxes (GPU)."""

from kfp.dsl import Dataset, Input, Model, Output

IMAGE = "gpu"


def pretrain(
    manifests: Input[Dataset], params_json: str, pipeline_run_id: str, idnet: Output[Model]
):
    """Train the IDNet that initialises the joint network; writes idnet.pt in `idnet`."""
    from pathlib import Path

    from psearch import stages
    from psearch.pipeline.runtime import stage_params, summary_line

    cfg = stage_params(params_json, pipeline_run_id)
    summary = stages.pretrain(Path(manifests.path), Path(idnet.path), cfg)
    print(summary_line("pretrain", summary))
