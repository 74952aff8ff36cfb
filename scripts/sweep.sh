#!/usr/bin/env bash
# Batches of runs: every combination of a spec's grid, each one notebooks/train.ipynb through papermill.
#   bash scripts/sweep.sh SPEC.yaml               # one run after another
#   bash scripts/sweep.sh SPEC.yaml --gpus all    # one run per GPU at a time
# The spec, the folders and summary.csv: docs/sweeps.md and s11lib/sweep.py.
set -euo pipefail
cd "$(dirname "$0")/.."
S11_EXTRAS= source scripts/setup-env.sh
exec python -m s11lib.sweep "$@"
