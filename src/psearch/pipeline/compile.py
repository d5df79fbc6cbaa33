"""Compile the Kubeflow pipeline (pipelines/person_search.py) to its IR YAML.

The DAG and the components live at the top of the checkout (`pipelines/`,
`components/`), next to params.yaml, not inside the installed package: they are
read when compiling, and the compiled YAML carries the component code into the
cluster, where the image only needs psearch itself.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from psearch.atomic import atomic_file
from psearch.config import Params
from psearch.errors import PsearchError
from psearch.pipeline.settings import PipelineSettings, load_settings

DEFAULT_PACKAGE = Path("pipelines") / "person_search.yaml"
DAG_FILE = Path("pipelines") / "person_search.py"


def project_root() -> Path:
    """The checkout that holds pipelines/ and components/: the current directory or a parent,
    else the checkout this package was installed from (editable installs)."""
    here = Path.cwd().resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[3]]
    for root in candidates:
        if (root / DAG_FILE).is_file() and (root / "components" / "__init__.py").is_file():
            return root
    raise PsearchError(
        f"{DAG_FILE}: not found in {here} or its parents (run from the psearch checkout)"
    )


def load_dag_module():
    root = str(project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.person_search")


def settings_for(params: Params) -> PipelineSettings:
    return load_settings(params.pipeline)


def pipeline_function(params: Params, settings: PipelineSettings | None = None):
    """The @dsl.pipeline function with `params` as the parameter defaults."""
    from psearch.pipeline.runtime import params_tree

    settings = settings or settings_for(params)
    return load_dag_module().build_pipeline(params_tree(params), settings)


def compile_pipeline(params: Params, out: str | Path = DEFAULT_PACKAGE) -> dict[str, Any]:
    """Write the pipeline IR (YAML) to `out` atomically; return a short summary."""
    from kfp import compiler

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
