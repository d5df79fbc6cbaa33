"""Kubeflow Pipelines v2 components: one module per psearch stage.

Each module holds a typed lightweight Python component function (KFP artifacts
in, KFP artifacts out) whose body imports psearch inside the function and calls
the same `psearch.stages` function as the CLI and DVC, and names the kind of
image it runs on (IMAGE = "cpu" or "gpu"). `build_components` turns them into
KFP components on the images of the given settings: the image names come from
one place, psearch.pipeline.settings. kfp and psearch are both installed in
those images, hence `install_kfp_package=False`; the same component runs under
`kfp.local.SubprocessRunner(use_venv=False)` on a workstation.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

from kfp import dsl

from components import (
    close_runs,
    evaluate,
    extract,
    extract_merge,
    ingest,
    pretrain,
    promote,
    register,
    tracking,
    train,
)
from psearch.pipeline.settings import PipelineSettings

# Stage name -> module; the stage name is also the key of its resources in the settings.
MODULES: dict[str, ModuleType] = {
    "tracking": tracking,
    "ingest": ingest,
    "pretrain": pretrain,
    "train": train,
    "extract": extract,
    "extract_merge": extract_merge,
    "evaluate": evaluate,
    "register": register,
    "promote": promote,
    "close_runs": close_runs,
}


def build_components(settings: PipelineSettings) -> SimpleNamespace:
    """Every stage as a KFP component on the image its kind names in `settings`."""
    built = {}
    for stage, module in MODULES.items():
        func = getattr(module, stage)
        built[stage] = dsl.component(
            func,
            base_image=settings.image(module.IMAGE),
            install_kfp_package=False,
        )
    return SimpleNamespace(**built)
