"""Register: the trained model as a new MLflow registry version; decide promotion."""

from kfp.dsl import Artifact, Input, Model

IMAGE = "cpu"


def register(
    model: Input[Model],
    report: Input[Artifact],
    params_json: str,
    pipeline_run_id: str,
) -> str:
    """Register `model` with the metrics in `report`; return the new version when it beats
    the champion (the pipeline's dsl.If then promotes it), else an empty string.

    One plain output rather than (version, beats) because kfp.local cannot resolve a
    condition on one field of a NamedTuple output.
    """
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import beats_champion, stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json, pipeline_run_id)
    summary = stages.register(Path(model.path), Path(report.path) / "metrics.json", cfg)
    print(summary_line("register", summary))
    beats, reason = beats_champion(cfg, summary["version"])
    print(f"psearch register: {reason}")
    return summary["version"] if beats else ""
