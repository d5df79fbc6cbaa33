"""Compile the Kubeflow pipeline (pipelines/person_search.py) to its IR YAML.

The compiled YAML carries each component's code into the cluster, where the
images hold psearch and the `components` package; the params (everything but
the `pipeline` section) become the default of the DAG's params_json parameter,
the `pipeline` section (images, resources, shards) shapes the DAG itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfp import compiler

from components.runtime import params_json
from pipelines.person_search import build_pipeline
from pipelines.settings import PipelineSettings, settings_for
from psearch.atomic import atomic_file
from psearch.config import Params
from psearch.errors import PsearchError

DEFAULT_PACKAGE = Path("pipelines") / "person_search.yaml"


def pipeline_function(params: Params, settings: PipelineSettings | None = None):
    """The @dsl.pipeline function with `params` as the parameter defaults."""
    return build_pipeline(
        params_json(params),
        settings or settings_for(params),
        with_pretrain=params.pretrain.enabled,
    )


def compile_pipeline(params: Params, out: str | Path = DEFAULT_PACKAGE) -> dict[str, Any]:
    """Write the pipeline IR (YAML) to `out` atomically; return a short summary."""
    out = Path(out)
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise PsearchError(f"{out}: the compiled pipeline must be a .yaml or .json file")
    settings = settings_for(params)
    func = pipeline_function(params, settings)
    with atomic_file(out) as tmp:
        # kfp picks the format from the suffix; keep it on the temporary name.
        staged = tmp.with_suffix(out.suffix)
        try:
            compiler.Compiler().compile(pipeline_func=func, package_path=str(staged))
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return {
        "package": str(out),
        "pipeline": settings.name,
        "image_cpu": settings.image("cpu"),
        "image_gpu": settings.image("gpu"),
        "extract_shards": settings.extract_shards,
    }
