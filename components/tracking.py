"""Open the MLflow run that groups one pipeline execution's stage runs."""

IMAGE = "cpu"


def tracking(params_json: str, kfp_run_id: str, kfp_run_name: str) -> str:
    """Create the pipeline's MLflow parent run; return its id ("" when tracking is off)."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from components.runtime import open_pipeline_run, stage_params

    return open_pipeline_run(stage_params(params_json), kfp_run_id, kfp_run_name)
