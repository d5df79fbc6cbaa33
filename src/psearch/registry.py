"""The MLflow model registry: register a trained model, promote it, roll back.

`register` adds the trained model (the `model_uri` its training run logged) as a
new version of `register.model_name`, with its evaluation metrics as version
tags and a description saying what it was trained on and how it scored, and logs
those metrics and plots to the training run that produced it (the version's run)
and to its own `register` run.
`promote` moves the `register.alias` alias (default `champion`) to a candidate
only when it beats the current champion on one metric (strictly greater); every
decision and both numbers are tagged on the candidate version. The aliases'
history is a JSON list in the registered model's tag `psearch.champion_history`
(oldest first, the current champion last), so `promote --rollback` can move the
alias back. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from psearch.config import Params
from psearch.digest import file_sha256
from psearch.errors import PsearchError
from psearch.jsonfile import read_json_object
from psearch.tracking import MODEL_SHA256_TAG, connect, stage_run, tracking_uri
from psearch.tracking.names import SEPARATOR

HISTORY_TAG = "psearch.champion_history"
PROMOTION_PREFIX = "psearch.promotion."


def flatten_metrics(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"search": {"gallery_100": {"mAP": 0.5}}} -> {"search.gallery_100.mAP": 0.5}."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def find_training_run(model_dir: Path, client, experiment: str) -> tuple[str, str]:
    """(run_id, model URI to register) of the training run that wrote `model_dir`.

    run.json holds no run id (it must hash alike on every run), so the run is the newest
    finished one in `experiment` whose MODEL_SHA256_TAG is the model file's hash: the run that
    logged exactly these weights. A run.json that does name its run (older outputs) is taken at
    its word. The URI is MLflow 3's logged-model id when the run has it, else its runs:/ URI.
    """
    model_dir = Path(model_dir)
    path = model_dir / "run.json" if model_dir.is_dir() else model_dir
    info = read_json_object(path, missing="training run record (run.json) not found")
    if info.get("run_id"):
        model_uri = info.get("logged_model_uri") or info.get("model_uri")
        return str(info["run_id"]), str(model_uri or f"runs:/{info['run_id']}/model")
    model_file = _model_file(path.parent)
    digest = file_sha256(model_file)
    found = client.get_experiment_by_name(experiment)
    runs = []
    if found is not None:
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{MODEL_SHA256_TAG}` = '{digest}' and status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    if not runs:
        raise PsearchError(
            f"{model_file}: no finished training run in experiment {experiment!r} logged this "
            "model (was it trained with tracking disabled, or against another store?)"
        )
    tags = runs[0].data.tags
    run_id = runs[0].info.run_id
    return run_id, tags.get("psearch.logged_model_uri") or f"runs:/{run_id}/model"


def _model_file(model_dir: Path) -> Path:
    """The one model file (*.pt) of a training output directory."""
    files = sorted(model_dir.glob("*.pt"))
    if len(files) != 1:
        raise PsearchError(
            f"{model_dir}: expected one model file (*.pt) beside run.json, found {len(files)}"
        )
    return files[0]


def read_metrics(path: Path) -> dict[str, float]:
    """The flattened metrics of an evaluation's metrics.json; refuses a file without search mAP."""
    flat = flatten_metrics(read_json_object(Path(path), missing="metrics file not found"))
    if not any(key.startswith("search.") and key.endswith(".mAP") for key in flat):
        raise PsearchError(f"{path}: no search mAP in it (not an evaluation's metrics.json?)")
    bad = [key for key, value in flat.items() if not math.isfinite(value)]
    if bad:
        raise PsearchError(f"{path}: {bad[0]} is not a finite number")
    return flat


def _client(params: Params):
    if not params.tracking.enabled:
        raise PsearchError("the model registry needs MLflow: tracking.enabled is false")
    return connect(params)


def _log_evaluation(client, run_id: str, metrics: dict[str, float], metrics_file: Path) -> None:
    """Metrics and plots go to the run that produced the evaluated model."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, 0) for key, value in metrics.items()]
    for start in range(0, len(batch), 200):
        client.log_batch(run_id, metrics=batch[start : start + 200])
    client.log_artifact(run_id, str(metrics_file), "evaluation")
    plots = Path(metrics_file).parent / "plots"
    if plots.is_dir():
        client.log_artifacts(run_id, str(plots), "evaluation/plots")


def _fmt(flat: dict[str, float], key: str) -> str:
    return f"{flat[key]:.3f}" if key in flat else "n/a"


def _source(source_json: str) -> str:
    """A dataset input's source, as a URI or path (MLflow stores it as JSON)."""
    try:
        source = json.loads(source_json)
    except ValueError:
        return source_json
    return str(source.get("uri", source_json)) if isinstance(source, dict) else source_json


def describe_version(train_run: Any, flat: dict[str, float]) -> str:
    """The model version's description (Markdown): its data, its training run, its scores."""
    tags = train_run.data.tags
    inputs = getattr(train_run, "inputs", None)
    datasets = [d.dataset for d in (inputs.dataset_inputs if inputs else [])]
    data = ", ".join(f"`{d.name}` (digest {d.digest}, from {_source(d.source)})" for d in datasets)
    data = data or "data of unknown origin"
    searched = sorted(
        k.split(".")[1] for k in flat if k.startswith("search.") and k.endswith(".mAP")
    )
    protocol = "gallery_100" if "gallery_100" in searched else (searched[0] if searched else "")
    lines = [
        f"Trained on {data}; data version `{tags.get('psearch.data_version', 'unknown')}`.",
        f"Training run `{train_run.info.run_name}` ({train_run.info.run_id}), "
        f"git `{tags.get('psearch.git_revision', 'unknown')[:12]}`.",
        "",
        f"Search ({protocol}): mAP {_fmt(flat, f'search.{protocol}.mAP')}, "
        f"top-1 {_fmt(flat, f'search.{protocol}.top1')}. "
        f"Detection: AP {_fmt(flat, 'detection.ap')}, recall {_fmt(flat, 'detection.recall')}.",
        "Plots: the training run's artifacts, evaluation/plots.",
    ]
    return "\n".join(lines)


def register(model: Path, metrics: Path, params: Params) -> dict[str, Any]:
    """Register the model trained in `model` (its run.json) with the metrics in `metrics`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    flat = read_metrics(Path(metrics))
    client = _client(params)
    run_id, model_uri = find_training_run(Path(model), client, params.tracking.experiment)
    try:
        train_run = client.get_run(run_id)
    except MlflowException:
        raise PsearchError(
            f"{model}: training run {run_id} is not in the tracking store {tracking_uri(params.tracking)}"
        ) from None
    name = params.register.model_name
    with stage_run("register", params, extra_tags={"psearch.model_run_id": run_id}) as run:
        _log_evaluation(client, run_id, flat, Path(metrics))
        _log_evaluation(client, run.info.run_id, flat, Path(metrics))
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:  # the pipeline run shows each execution's results side by side
            _log_evaluation(client, parent, flat, Path(metrics))
        source = train_run.data.tags
        tags = {
            **{key: repr(value) for key, value in flat.items()},
            "psearch.train_run_id": run_id,
            "psearch.data_version": source.get("psearch.data_version", "unknown"),
            "psearch.git_revision": source.get("psearch.git_revision", "unknown"),
        }
        version = mlflow.register_model(model_uri, name, tags=tags)
        client.update_model_version(name, version.version, describe_version(train_run, flat))
        mlflow.log_params({"model_name": name, "model_version": version.version})
        mlflow.set_tag("mlflow.runName", f"register{SEPARATOR}{name} v{version.version}")
    return {
        "model_name": name,
        "version": str(version.version),
        "model_uri": model_uri,
        "run_id": run_id,
        "register_run_id": run.info.run_id,
        "pipeline_run_id": parent,
        "metrics": flat,
    }


# ---------------------------------------------------------------------------
# promotion


def _versions(client, name: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise PsearchError(f"no registered model {name!r} (run `psearch register` first)") from None
    found = client.search_model_versions(f"name = '{name}'")
    return {str(v.version): v for v in found}


def _champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _history(client, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    try:
        history = json.loads(raw)
    except ValueError:
        history = []
    return [str(v) for v in history] if isinstance(history, list) else []


def _metric_value(version, metric: str, name: str) -> float | None:
    raw = version.tags.get(metric)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise PsearchError(
            f"{name} version {version.version}: tag {metric}={raw!r} is not a number"
        ) from None


def _set_champion(client, name: str, alias: str, version: str, history: list[str]) -> None:
    client.set_registered_model_alias(name, alias, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _rollback(client, name: str, alias: str) -> dict[str, Any]:
    champion = _champion(client, name, alias)
    current = str(champion.version) if champion else None
    history = _history(client, name)
    if history and history[-1] == current:
        history.pop()
    if not history:
        raise PsearchError(f"{name}: no previous {alias} to roll back to")
    previous = history[-1]
    _set_champion(client, name, alias, previous, history)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if current:
        client.set_model_version_tag(name, current, f"{PROMOTION_PREFIX}rolled_back_at", stamp)
    client.set_model_version_tag(name, previous, f"{PROMOTION_PREFIX}restored_at", stamp)
    return {
        "model_name": name,
        "alias": alias,
        "promoted": True,
        "rollback": True,
        "from_version": current,
        "to_version": previous,
        "decision": f"rolled {alias} back from version {current} to version {previous}",
    }


def decide(
    candidate: str,
    candidate_value: float | None,
    champion: str | None,
    champion_value: float | None,
    metric: str,
    alias: str,
    force: bool = False,
) -> tuple[bool, str]:
    """The promotion rule, in one place: strictly greater on `metric`, or no champion yet."""
    if champion == candidate:
        return False, f"version {candidate} already is the {alias}"
    if champion is None:
        return True, f"no {alias} yet: version {candidate} becomes the {alias}"
    if force:
        return True, f"forced: version {candidate} replaces version {champion}"
    if champion_value is None:
        raise PsearchError(f"{alias} version {champion} has no metric tag {metric} (use --force)")
    if candidate_value is not None and candidate_value > champion_value:
        return True, (
            f"version {candidate} beats version {champion} on {metric} "
            f"({candidate_value:.4f} > {champion_value:.4f}): promoted"
        )
    shown = "none" if candidate_value is None else f"{candidate_value:.4f}"
    return False, (
        f"version {candidate} does not beat version {champion} on {metric} "
        f"({shown} <= {champion_value:.4f}): {alias} unchanged"
    )


def champion_decision(params: Params, version: str, metric: str | None = None) -> tuple[bool, str]:
    """Would `psearch promote --version VERSION` move the champion alias? (reads, never writes)"""
    client = _client(params)
    name, alias = params.register.model_name, params.register.alias
    metric = metric or params.register.metric
    versions = _versions(client, name)
    if str(version) not in versions:
        raise PsearchError(f"{name}: no version {version}")
    candidate_value = _metric_value(versions[str(version)], metric, name)
    champion = _champion(client, name, alias)
    champion_version = str(champion.version) if champion else None
    champion_value = _metric_value(champion, metric, name) if champion else None
    return decide(str(version), candidate_value, champion_version, champion_value, metric, alias)


def promote(
    params: Params,
    metric: str | None = None,
    force: bool = False,
    rollback: bool = False,
    version: str | None = None,
) -> dict[str, Any]:
    """Move the champion alias to `version` (default: the latest) if it beats the champion."""
    client = _client(params)
    name, alias = params.register.model_name, params.register.alias
    metric = metric or params.register.metric
    versions = _versions(client, name)
    if rollback:
        return _rollback(client, name, alias)
    if not versions:
        raise PsearchError(f"{name}: no versions registered")
    chosen = str(version) if version is not None else max(versions, key=int)
    if chosen not in versions:
        raise PsearchError(
            f"{name}: no version {chosen} (have {', '.join(sorted(versions, key=int))})"
        )
    candidate = versions[chosen]
    candidate_value = _metric_value(candidate, metric, name)
    if candidate_value is None and not force:
        raise PsearchError(f"{name} version {chosen} has no metric tag {metric}")
    champion = _champion(client, name, alias)
    champion_version = str(champion.version) if champion else None
    champion_value = _metric_value(champion, metric, name) if champion else None
    promoted, decision = decide(
        chosen, candidate_value, champion_version, champion_value, metric, alias, force
    )
    if promoted:
        _set_champion(client, name, alias, chosen, [*_history(client, name), chosen])
    if champion_version != chosen:
        record = {
            "metric": metric,
            "candidate_value": repr(candidate_value),
            "champion_version": str(champion_version),
            "champion_value": repr(champion_value),
            "promoted": str(promoted).lower(),
            "decision": decision,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for key, value in record.items():
            client.set_model_version_tag(name, chosen, PROMOTION_PREFIX + key, value)
    return {
        "model_name": name,
        "alias": alias,
        "metric": metric,
        "candidate_version": chosen,
        "candidate_value": candidate_value,
        "champion_version": champion_version,
        "champion_value": champion_value,
        "promoted": promoted,
        "rollback": False,
        "decision": decision,
    }
