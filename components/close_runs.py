"""The pipeline's exit handler: end the execution's MLflow runs with its final state."""

from kfp import dsl

IMAGE = "cpu"


def close_runs(params_json: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus) -> None:
    """Mark the pipeline's MLflow parent run, and stage runs a killed pod left RUNNING, as
    FINISHED, FAILED or KILLED: it runs after every other task, whether they failed or not.
    """
    # Imports inside the body: KFP runs only this function's source in the pod.
    from components.runtime import close_pipeline_runs, stage_params

    closed = close_pipeline_runs(stage_params(params_json), kfp_run_id, status.state)
    print(f"psearch close-runs: pipeline {status.state}; ended MLflow runs {closed}")
