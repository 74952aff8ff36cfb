#!/usr/bin/env bash
# The main job: run notebooks/train.ipynb through papermill (40 epochs by default).
#   bash scripts/train.sh                                  # data in ./data (downloaded if missing)
#   bash scripts/train.sh -p data_dir ~/cifar -p epochs 5  # any papermill options, e.g. parameters
# The parameters are checked before the kernel starts, the run's output is shown as it comes, and
# the executed notebook is written into the run's folder: OUT_DIR/train.ipynb (s11lib/notebook.py).
set -euo pipefail
cd "$(dirname "$0")/.."
S11_EXTRAS= source scripts/setup-env.sh
exec python -m s11lib.notebook "$@"
