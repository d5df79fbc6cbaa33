"""Kubeflow Pipelines v2 components: one module per psearch stage.

Each module holds a typed lightweight Python component function (KFP artifacts
in, KFP artifacts out) whose body calls the same `psearch.stages` function as
the CLI and DVC, with the shared steps from components.runtime, and names the
kind of image it runs on (IMAGE = "cpu" or "gpu"). KFP ships only a function's
source to the pod, so each body imports what it uses inside the function; the
images install psearch and these packages (and kfp, hence
`install_kfp_package=False`), and the same component runs under
`kfp.local.SubprocessRunner(use_venv=False)` on a workstation.

`build_components` turns them into KFP components on the images it is given;
the DAG (pipelines/person_search.py) passes them from pipelines.settings, the
one place image names come from. This package never imports `pipelines`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType, SimpleNamespace

from kfp import dsl

from components import (
    close_runs,
    dataset_digest,
    evaluate,
    extract,
    extract_merge,
    index,
    ingest,
    pretrain,
    promote,
    register,
    tracking,
    train,
    train_nodes,
)

# Stage name -> module; the stage name is also the key of its resources in the settings.
MODULES: dict[str, ModuleType] = {
    "tracking": tracking,
    "dataset_digest": dataset_digest,
    "ingest": ingest,
    "pretrain": pretrain,
    "train": train,
    # pipeline.train_nodes > 1: train as a Kubeflow Trainer TrainJob (components.trainjob)
    "train_nodes": train_nodes,
    "extract": extract,
    "extract_merge": extract_merge,
    "evaluate": evaluate,
    "index": index,
    "register": register,
    "promote": promote,
    "close_runs": close_runs,
}


def build_components(images: Mapping[str, str]) -> SimpleNamespace:
    """Every stage as a KFP component on `images[kind]`, its kind being "cpu" or "gpu"."""
    built = {}
    for stage, module in MODULES.items():
        func = getattr(module, stage)
        built[stage] = dsl.component(
            func,
            base_image=images[module.IMAGE],
            install_kfp_package=False,
        )
    return SimpleNamespace(**built)
