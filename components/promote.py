"""Promote: move the champion alias to the newly registered version."""

IMAGE = "cpu"


def promote(params_json: str, version: str) -> str:
    """Promote `version` (it beat the champion at registration); return the decision line."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from components.runtime import stage_params, summary_line
    from psearch import stages

    cfg = stage_params(params_json)
    summary = stages.promote(cfg, version=version)
    print(summary_line("promote", summary))
    return summary["decision"]
