"""`psearch paper`: the runs the paper's tables and figures need, composed from psearch.stages.

For a dataset (a synthetic preset, or given manifests) and a recipe (params.yaml):

- IDNet pretraining, then three trainings from it: the joint net with RSS (the paper's
  method), with the plain softmax (Fig. 6's baseline), and the detector alone
  (`train.loss.reid_loss: none`, the paper's separately trained "Deep" detector);
- extractions: the joint net on its own detections and on the ground-truth boxes, IDNet's
  features on the Deep detector's boxes and on the ground-truth boxes (the two-stage rows of
  Table 2), the softmax net on its detections;
- evaluations of each (every gallery size the dataset has, both subsets), and with CBGM
  re-ranking for the Table 2 runs;
- for Fig. 6 at more identities, a second, shorter leg on another preset (many-ids: 3,000
  training identities): synth, ingest, pretrain, RSS and softmax trainings, their evaluations.

Every step is a stage function writing its normal output, in a directory keyed on its inputs
and params (psearch.experiments.cache), so a re-run skips what is finished, and a training
killed midway continues from its newest checkpoint (`--resume`: only one made with the same
settings). With tracking on,
every stage's MLflow run is a child of one parent run for the report directory (reused by a
re-run). `run_paper` returns the results that report.py writes up.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psearch import stages
from psearch.config import Params, to_dict
from psearch.errors import PsearchError
from psearch.experiments.cache import RunCache, StepResult
from psearch.jsonfile import read_json_object
from psearch.registry import flatten_metrics
from psearch.tracking import PARENT_RUN_ENV, ParentRun, data_version, stage_metrics, stage_run

STEPS_DIR = "steps"
PARENT_TAG = "psearch.paper_out"  # the report directory a parent run belongs to
MORE_IDS_PRESET = "many-ids"
MORE_IDS_STEPS = 300  # pretrain and train steps of the Fig. 6 leg at many identities

# The runs of the report, by label: (training, boxes, features).
MAIN_RUNS = {
    "joint": ("rss", "detect", "joint"),
    "joint_gt": ("rss", "gt", "joint"),
    "deep_idnet": ("detector", "detect", "idnet"),
    "gt_idnet": ("detector", "gt", "idnet"),
    "softmax": ("softmax", "detect", "joint"),
}
MORE_IDS_RUNS = {label: MAIN_RUNS[label] for label in ("joint", "softmax")}
CBGM_RUNS = ("joint", "joint_gt", "deep_idnet", "gt_idnet")  # Table 2 with re-ranking
TRAININGS = {"rss": "rss", "softmax": "softmax", "detector": "none"}  # -> train.loss.reid_loss


@dataclass(frozen=True)
class PaperOptions:
    out: Path
    preset: str | None = None  # None: params.data.preset (ignored with manifests)
    manifests: Path | None = None  # instead of synth + ingest
    more_ids: str | None = MORE_IDS_PRESET  # None: no second Fig. 6 leg
    more_ids_steps: int = MORE_IDS_STEPS
    cbgm: bool = True


def run_paper(params: Params, options: PaperOptions) -> dict[str, Any]:
    """Run (or find finished) every step; return the results (results.json's content)."""
    if options.more_ids_steps < 1:
        raise PsearchError(f"--more-ids-steps: {options.more_ids_steps} must be at least 1")
    if options.manifests is not None and not (Path(options.manifests) / "dataset.json").is_file():
        raise PsearchError(f"{options.manifests}: not a manifests directory (no dataset.json)")
    params = _paper_recipe(params)
    out = Path(options.out)
    cache = RunCache(out / STEPS_DIR)
    with _parent_run(params, out) as parent_id:
        legs = {"main": _leg(cache, params, options, MAIN_RUNS, options.cbgm)}
        if options.more_ids:
            short = _more_ids_recipe(params, options.more_ids, options.more_ids_steps)
            leg_options = dataclasses.replace(options, preset=options.more_ids, manifests=None)
            legs["more_ids"] = _leg(cache, short, leg_options, MORE_IDS_RUNS, cbgm=False)
    steps = [
        {
            "step": r.name,
            "directory": str(r.directory),
            "cached": r.cached,
            "seconds": r.seconds,
        }
        for r in cache.results
    ]
    return {"legs": legs, "steps": steps, "mlflow_parent_run": parent_id}


# ------------------------------------------------------------------------------ recipes


def _with_loss(params: Params, reid_loss: str) -> Params:
    loss = dataclasses.replace(params.train.loss, reid_loss=reid_loss)
    return dataclasses.replace(params, train=dataclasses.replace(params.train, loss=loss))


def _paper_recipe(params: Params) -> Params:
    """The recipe with IDNet pretraining on (the paper's method needs it)."""
    if not params.pretrain.enabled:
        raise PsearchError(
            "pretrain.enabled is false: the paper's runs start from an IDNet (and its "
            "features are Table 2's two-stage columns); use a recipe with pretraining"
        )
    return params


def _more_ids_recipe(params: Params, preset: str, steps: int) -> Params:
    """The Fig. 6 leg: the same recipe, on `preset`, `steps` iterations of each training."""
    data = dataclasses.replace(params.data, preset=preset)
    pretrain = dataclasses.replace(params.pretrain, max_steps=steps)
    train = dataclasses.replace(params.train, max_steps=steps)
    return dataclasses.replace(params, data=data, pretrain=pretrain, train=train)


# ------------------------------------------------------------------------------ one leg


def _leg(
    cache: RunCache,
    params: Params,
    options: PaperOptions,
    runs: dict[str, tuple[str, str, str]],
    cbgm: bool,
) -> dict[str, Any]:
    """One dataset's steps: data, IDNet, the trainings `runs` need, extractions, evaluations."""
    manifests, data_key, dataset = _dataset(cache, params, options)
    pretrain_settings = {
        "model": to_dict(params.model),
        "pretrain": to_dict(params.pretrain),
        "loss": to_dict(params.pretrain.loss or params.train.loss),
    }
    idnet = cache.run(
        "pretrain",
        pretrain_settings,
        [data_key],
        lambda d: stages.pretrain(manifests, d, params, resume=True),
    )
    trainings: dict[str, StepResult] = {}
    for name in dict.fromkeys(training for training, _, _ in runs.values()):
        recipe = _with_loss(params, TRAININGS[name])
        trainings[name] = cache.run(
            f"train-{name}",
            {"model": to_dict(recipe.model), "train": to_dict(recipe.train)},
            [data_key, idnet.key],
            lambda d, recipe=recipe: stages.train(
                manifests, d, recipe, init=idnet.directory, resume=True
            ),
        )
    results: dict[str, Any] = {}
    for label, (training, boxes, features) in runs.items():
        model = trainings[training]
        extraction = cache.run(
            f"extract-{training}-{boxes}-{features}",
            {
                "model": to_dict(params.model),
                "extract": to_dict(params.extract),
                "boxes": boxes,
                "features": features,
            },
            [data_key, model.key] + ([idnet.key] if features == "idnet" else []),
            lambda d, m=model, b=boxes, f=features: stages.extract(
                manifests,
                str(m.directory),
                d,
                params,
                boxes=b,
                features=f,
                idnet=idnet.directory / "idnet.pt" if f == "idnet" else None,
            ),
        )
        for rerank in (False, True) if cbgm and label in CBGM_RUNS else (False,):
            evaluation = _evaluate(cache, params, manifests, data_key, extraction, label, rerank)
            results[label + ("+cbgm" if rerank else "")] = {
                "training": training,
                "boxes": boxes,
                "features": features,
                "cbgm": rerank,
                "train_dir": str(model.directory),
                "extract_dir": str(extraction.directory),
                "eval_dir": str(evaluation.directory),
                "metrics": read_json_object(evaluation.directory / "metrics.json"),
            }
    return {
        **dataset,
        "manifests": str(manifests),
        "train_identities": _train_identities(trainings),
        "steps": {"pretrain": params.pretrain.max_steps, "train": params.train.max_steps},
        "trainings": {
            name: {
                "directory": str(step.directory),
                "run": read_json_object(step.directory / "run.json"),
                "history": read_history(step.directory / "history.csv"),
            }
            for name, step in trainings.items()
        },
        "runs": results,
    }


def _dataset(
    cache: RunCache, params: Params, options: PaperOptions
) -> tuple[Path, str, dict[str, Any]]:
    """(manifests, their key for the steps that read them, a description)."""
    if options.manifests is not None:
        manifests = Path(options.manifests)
        version = data_version(manifests)
        if version == "unknown":  # no content hash recorded: the place stands in for it
            version = str(manifests.resolve())
        return manifests, f"manifests:{version}", {"dataset": str(manifests)}
    data = dataclasses.replace(params.data, preset=options.preset or params.data.preset)
    raw = cache.run("synth", {"data": to_dict(data)}, [], lambda d: stages.synth(d, data))
    ingested = cache.run(
        "ingest",
        {"ingest": to_dict(params.ingest)},
        [raw.key],
        lambda d: stages.ingest(raw.directory, d, params.ingest),
    )
    return ingested.directory, ingested.key, {"dataset": f"synthetic preset {data.preset}"}


def _evaluate(
    cache: RunCache,
    params: Params,
    manifests: Path,
    data_key: str,
    extraction: StepResult,
    label: str,
    cbgm: bool,
) -> StepResult:
    cfg = dataclasses.replace(params.evaluate, cbgm=cbgm)

    def work(directory: Path) -> None:
        # psearch evaluate opens no MLflow run; here it is one, so the parent shows its metrics.
        detail = label + (" · cbgm" if cbgm else "")
        with stage_run("evaluate", params, manifests, split="test", name_detail=detail) as run:
            metrics = stages.evaluate(manifests, extraction.directory, directory, cfg)
            if run is not None:
                import mlflow  # lazy: seconds to import; only a tracked run needs it

                mlflow.log_metrics(stage_metrics("evaluate", flatten_metrics(metrics)))

    name = f"evaluate-{label}" + ("-cbgm" if cbgm else "")
    return cache.run(name, {"evaluate": to_dict(cfg)}, [data_key, extraction.key], work)


def _train_identities(trainings: dict[str, StepResult]) -> int | None:
    for step in trainings.values():
        count = read_json_object(step.directory / "run.json").get("num_classes")
        if isinstance(count, int):
            return count
    return None


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv of a training (psearch.train.runner): its rows, numbers only."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [
            {key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(handle)
        ]


# ------------------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def _parent_run(params: Params, out: Path) -> Iterator[str | None]:
    """The MLflow parent run of this report directory (created, or reused by a re-run); its
    id is in $PSEARCH_PARENT_RUN_ID while the steps run, so each stage run is its child."""
    if not params.tracking.enabled:
        yield None
        return
    where = str(out.resolve())
    found = ParentRun.find(params, PARENT_TAG, where)
    if found:
        parent = found[0]
        parent.client.update_run(parent.run_id, status="RUNNING")
    else:
        parent = ParentRun.create(params, "paper", label=out.name, tags={PARENT_TAG: where})
    before = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = parent.run_id
    status = "FAILED"
    try:
        yield parent.run_id
        status = "FINISHED"
    finally:
        if before is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = before
        parent.finish(status)
