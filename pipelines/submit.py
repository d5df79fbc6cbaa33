"""Submit the pipeline to a Kubeflow Pipelines endpoint with kfp.Client.

Idempotent on the server side: the experiment is created only when missing,
the pipeline is uploaded the first time and gets a new version every later
time, then one run of that version starts with the submitter's params.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import kfp
import yaml
from kfp_server_api.exceptions import ApiException

from components.runtime import params_json
from pipelines.compile import compile_pipeline
from pipelines.settings import settings_for
from psearch.config import Params
from psearch.errors import PsearchError
from psearch.tracking import git_revision

# Set from the params (file + --set + --param SECTION.KEY=VALUE), never given directly.
PARAMS_ARGUMENT = "params_json"


def split_run_params(assignments: list[str]) -> tuple[list[str], dict[str, str]]:
    """--param values: SECTION.KEY=VALUE go to the params, NAME=VALUE are pipeline arguments."""
    overrides, arguments = [], {}
    for item in assignments:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise PsearchError(f"--param {item!r}: expected NAME=VALUE")
        if "." in name:
            overrides.append(item)
        elif name == PARAMS_ARGUMENT:
            raise PsearchError(
                f"--param {name}: set params with --params FILE, --set or --param SECTION.KEY=VALUE"
            )
        else:
            arguments[name] = value
    return overrides, arguments


def pipeline_inputs(package: Path) -> dict[str, Any]:
    """The compiled pipeline's parameters and their defaults."""
    try:
        # The pipeline spec, then (with kfp-kubernetes settings) the platform spec.
        spec = next(yaml.safe_load_all(package.read_text()))
        params = spec["root"]["inputDefinitions"]["parameters"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration):
        raise PsearchError(f"{package}: not a compiled KFP pipeline") from None
    return {name: entry.get("defaultValue") for name, entry in params.items()}


def check_reachable(host: str) -> None:
    """Fail in seconds, not after kfp.Client's retries, when the endpoint does not answer."""
    if not host.startswith(("http://", "https://")):
        raise PsearchError(f"--host {host!r}: expected an http:// or https:// URL")
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise PsearchError(
                f"{host}: Kubeflow refused the request (HTTP {exc.code}); log in or port-forward "
                "ml-pipeline-ui (see docs/kubeflow.md)"
            ) from None
        raise PsearchError(f"{host}: not a Kubeflow Pipelines API (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PsearchError(f"{host}: Kubeflow Pipelines is unreachable ({reason})") from None


def default_version_name(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{name}-{stamp}-{git_revision()[:8]}"


def submit(
    params: Params,
    host: str,
    experiment: str = "person-search",
    run_name: str | None = None,
    arguments: dict[str, str] | None = None,
    namespace: str | None = None,
    version_name: str | None = None,
    package: str | Path | None = None,
) -> dict[str, Any]:
    """Upload the pipeline (or a new version of it) and start a run; return ids and the URL."""
    settings = settings_for(params)
    arguments = dict(arguments or {})
    check_reachable(host)
    with tempfile.TemporaryDirectory(prefix="psearch-submit-") as tmp:
        if package is None:
            package = Path(tmp) / "person_search.yaml"
            compile_pipeline(params, package)
        package = Path(package)
        if not package.is_file():
            raise PsearchError(f"{package}: compiled pipeline not found")
        known = pipeline_inputs(package)
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            names = ", ".join(sorted(n for n in known if n != PARAMS_ARGUMENT))
            raise PsearchError(f"--param {unknown[0]}: not a pipeline parameter (has: {names})")
        arguments[PARAMS_ARGUMENT] = params_json(params)
        run_name = run_name or f"{settings.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        version_name = version_name or default_version_name(settings.name)
        ids = _upload_and_run(
            host, namespace, settings.name, version_name, package, experiment, run_name, arguments
        )
    url = f"{host.rstrip('/')}/#/runs/details/{ids['run_id']}"
    return {**ids, "url": url, "run_name": run_name, "version_name": version_name}


def _upload_and_run(
    host: str,
    namespace: str | None,
    name: str,
    version_name: str,
    package: Path,
    experiment: str,
    run_name: str,
    arguments: dict[str, Any],
) -> dict[str, str]:
    # kfp.Client prints its own links and warns about server versions; we print one line.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
            exp = client.create_experiment(experiment, namespace=namespace)
            pipeline_id = client.get_pipeline_id(name)
            if pipeline_id is None:
                pipeline_id = client.upload_pipeline(str(package), pipeline_name=name).pipeline_id
                versions = client.list_pipeline_versions(
                    pipeline_id, page_size=1, sort_by="created_at desc"
                ).pipeline_versions
                if not versions:
                    raise PsearchError(f"{host}: pipeline {name} was uploaded without a version")
                version_id = versions[0].pipeline_version_id
            else:
                version_id = client.upload_pipeline_version(
                    str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id
                ).pipeline_version_id
            run = client.run_pipeline(
                experiment_id=exp.experiment_id,
                job_name=run_name,
                pipeline_id=pipeline_id,
                version_id=version_id,
                params=arguments,
            )
        except ApiException as exc:
            reason = (exc.body or exc.reason or "").strip().splitlines()
            detail = reason[0][:300] if reason else f"HTTP {exc.status}"
            raise PsearchError(f"{host}: Kubeflow refused the submission ({detail})") from None
    return {
        "experiment_id": exp.experiment_id,
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "run_id": run.run_id,
    }
