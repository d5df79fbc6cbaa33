#!/usr/bin/env bash
# `make demo`: the whole pipeline with DVC on the synthetic demo dataset, then a summary
# (metrics, a random-feature baseline, stage times, the registry, where plots and MLflow are).
# Extra arguments go to `dvc repro` (e.g. `bash scripts/demo.sh --force`).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in psearch dvc python; do
    command -v "$tool" >/dev/null || { echo "error: $tool not on PATH (run: make install)" >&2; exit 2; }
done
if ! git rev-parse --git-dir >/dev/null 2>&1; then
    echo "error: $(pwd) is not a git repository (DVC needs one: clone the project with git)" >&2
    exit 2
fi
# No usage reporting from the tools (and nothing reaches out of this machine).
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1

start=$(date +%s)
dvc repro "$@"
elapsed=$(( $(date +%s) - start ))
python scripts/demo_summary.py --elapsed "$elapsed"
