#!/usr/bin/env bash
# The test suite: bash scripts/test.sh [pytest options]
# Set S11_CIFAR10_DIR to the folder that holds cifar-10-batches-py/ to test on the real CIFAR-10;
# unset, the data tests use a small synthetic set (the pytest header says which).
set -euo pipefail
cd "$(dirname "$0")/.."
S11_EXTRAS=test source scripts/setup-env.sh
# The browser test drives Debian's chromium; install it when we may (root with apt), else the
# test is skipped and pytest's summary says so.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser test" >&2
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null ||
    echo "could not install chromium; the browser test will be skipped" >&2
fi
exec python -m pytest "$@"
