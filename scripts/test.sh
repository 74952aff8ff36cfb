#!/usr/bin/env bash
# The test suite: bash scripts/test.sh [pytest options]
# Set S11_CIFAR10_DIR to the folder that holds cifar-10-batches-py/ to test on the real CIFAR-10;
# unset, the data tests use a small synthetic set (the pytest header says which).
set -euo pipefail
cd "$(dirname "$0")/.."
S11_EXTRAS=test source scripts/setup-env.sh
exec python -m pytest "$@"
