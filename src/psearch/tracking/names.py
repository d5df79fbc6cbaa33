"""What a run and its metrics are called in the MLflow UI, so that rows and charts say what
they are.

- A stage run is named `stage · what it trained · backbone · data digest`, e.g.
  `train · rss · small · 3f2a9c` (`pretrain · softmax · small · 3f2a9c`; extract names its
  boxes / features modes); the digest is the manifests' content hash, so runs on the
  same data read alike and runs on other data stand out.
- A pipeline's parent run is named for its runner and when it started, e.g.
  `dvc · 2026-12-02 21:40 UTC` or `kubeflow · <KFP run name>`.
- A stage's metrics are namespaced by the stage (`pretrain/acc_reid`, `train/acc_reid`):
  the UI groups charts by that prefix and no chart overlays two stages' quantities.
"""

from __future__ import annotations

import time

from psearch.config import Params
from psearch.tracking.datasets import short_digest

SEPARATOR = " · "
# The training run's tag holding its model file's sha256: how `psearch register` finds the run
# that trained a model directory (run.json holds no run id: it must hash alike on every run).
MODEL_SHA256_TAG = "psearch.model_sha256"
# Characters of the data digest a run name shows (a git-style short hash).
NAME_DIGEST_LENGTH = 6


def stage_run_name(
    stage: str, params: Params, data_version: str = "unknown", detail: str = ""
) -> str:
    """`stage · detail · data digest`; the training stages' detail is their loss and backbone."""
    if not detail and stage == "pretrain":
        idnet_loss = params.pretrain.loss or params.train.loss  # IDNet's own, else the joint's
        detail = f"{idnet_loss.reid_loss}{SEPARATOR}{params.model.backbone}"
    elif not detail and stage == "train":
        detail = f"{params.train.loss.reid_loss}{SEPARATOR}{params.model.backbone}"
    parts = [stage, detail, short_digest(data_version, NAME_DIGEST_LENGTH)]
    return SEPARATOR.join(part for part in parts if part)


def parent_run_name(runner: str, label: str | None = None, start_ms: int | None = None) -> str:
    """`runner · label`, the label defaulting to the UTC start time."""
    if not label:
        seconds = start_ms / 1000 if start_ms is not None else time.time()
        label = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))
    return f"{runner}{SEPARATOR}{label}"


def stage_metrics(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """{"acc_reid": 0.4} -> {"<stage>/acc_reid": 0.4}: the key MLflow shows."""
    return {f"{stage}/{key}": value for key, value in metrics.items()}
