"""Train on several nodes: the train step as a Kubeflow Trainer TrainJob (pipeline.train_nodes > 1).

This task only launches and follows the job (CPU image, small resources); the nodes run
`psearch train` under torchrun on the GPU image, and the model comes back through the
checkpoint PVC into this task's `model` output, which the next tasks take as from `train`.
"""

from typing import Optional

from kfp.dsl import Dataset, Input, Model, Output

IMAGE = "cpu"


def train_nodes(
    manifests: Input[Dataset],
    params_json: str,
    pipeline_run_id: str,
    checkpoint_root: str,
    kfp_run_id: str,
    trainjob: str,
    model: Output[Model],
    idnet: Optional[Input[Model]] = None,  # noqa: UP045 (KFP reads this annotation's form)
):
    """Run the joint training as a TrainJob built from `trainjob` (the DAG's JSON template);
    `model` receives model.pt and run.json. A retry follows (or restarts) the same job."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.trainjob import run_trainjob

    init = Path(idnet.path) if idnet is not None else None
    run_trainjob(
        trainjob,
        Path(manifests.path),
        params_json,
        pipeline_run_id,
        checkpoint_root,
        kfp_run_id,
        Path(model.path),
        init=init,
    )
