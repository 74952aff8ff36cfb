#!/usr/bin/env bash
# The main job: run notebooks/train.ipynb through papermill (40 epochs by default).
#   bash scripts/train.sh                                  # data in ./data (downloaded if missing)
#   bash scripts/train.sh -p data_dir ~/cifar -p epochs 5  # any papermill options, e.g. parameters
# The executed notebook is written to runs/train.ipynb, the run's files to runs/train/ (out_dir).
set -euo pipefail
cd "$(dirname "$0")/.."
S11_EXTRAS= source scripts/setup-env.sh
mkdir -p runs
exec papermill notebooks/train.ipynb runs/train.ipynb --cwd . "$@"
