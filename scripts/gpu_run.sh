#!/usr/bin/env bash
# The real run on a lent GPU machine, as issue 27's "If a GPU is available" asks: a 2-epoch smoke
# run, then the run at the shipped defaults, each under its own time limit, with its log and its
# small files (everything but the checkpoints) sent into OUT as they come. The machine keeps
# nothing, and a run cut off at its limit still sends back the epochs it finished. From the
# repository root, on that machine, once the data is unpacked:
#
#   bash scripts/gpu_run.sh DATA_DIR OUT [SEED] [-- more s11lib.run options, for both runs]
#   bash scripts/gpu_run.sh /root/data "$OUT" 1
#
# Limits in seconds, from the environment: SMOKE_S (default 120) and RUN_S (default 420); a run
# resumes from its last.pt when called again on the same warm machine (RUNS_DIR, default
# /root/runs, keeps the run folders). OUT gets 5 files, inside the device tool's 8: summary.txt
# (the GPU, torch, and each run's command, exit status and wall time), and a NAME.log and a
# NAME.tar per run. It needs only what that machine has: python3 with torch, torchvision, numpy,
# matplotlib and tqdm (PYTHON names another interpreter). The smoke run failing stops it.
#
# With this workplace's device tool: `../shared/tools/cifar10-for-device .device-data` here packs
# the data into three chunks, then three calls back to back, each carrying one chunk:
#   1. carry .device-data/cifar10.tar.xz.00: mkdir -p /root/stage && cp .device-data/cifar10.tar.xz.00 /root/stage/
#   2. the same with .01
#   3. carry .02, timeout_s 600: the same cp, then the tool's unpacking into /root/data, then
#      `bash scripts/gpu_run.sh /root/data "$OUT" 1`
# The files come back in $OUT; the runs' files go to results/gpu-<GPU name>-seed<N>/ (issue 27).
set -uo pipefail
usage="usage: bash scripts/gpu_run.sh DATA_DIR OUT [SEED] [-- s11lib.run options]"
data=${1:?$usage}
out=${2:?$usage}
seed=${3:-1}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
runs=${RUNS_DIR:-/root/runs}
mkdir -p "$out" "$runs" || exit
out=$(cd "$out" && pwd) && runs=$(cd "$runs" && pwd) && data=$(cd "$data" && pwd) || exit  # before the cd below
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

$python - > "$out/summary.txt" <<'PY' || exit
import torch
where = (f"{torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}, "
         f"{torch.cuda.device_count()} GPU(s))" if torch.cuda.is_available() else "no CUDA GPU")
print(f"{where}; torch {torch.__version__}")
PY
gpu=$($python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" |
      tr -c 'A-Za-z0-9.\n' '-')

small() {  # small RUN_DIR TAR: the run's files but its checkpoints, as one tar in OUT
  [ -d "$1" ] || return 0
  tar -C "$1" -cf "$2.part" --exclude='*.pt' --exclude='./.*' . && mv -f "$2.part" "$2"
}

one() {  # one NAME SECONDS [s11lib.run options]
  local name=$1 limit=$2 code start copier
  shift 2
  local command=($python -m s11lib.run --data-dir "$data" --download false --progress false --seed "$seed"
                 --out-dir "$runs/$name" "$@")
  echo "$name: ${command[*]} (limit ${limit} s)" >> "$out/summary.txt"
  ( while sleep 15; do small "$runs/$name" "$out/$name.tar"; done ) > /dev/null 2>&1 &  # a sleep it leaves must not hold the caller's pipe open
  copier=$!
  start=$(date +%s)
  timeout -k 10 "$limit" "${command[@]}" > "$out/$name.log" 2>&1
  code=$?
  kill "$copier" 2>/dev/null
  wait "$copier" 2>/dev/null
  small "$runs/$name" "$out/$name.tar"
  local said="exit $code"
  [ "$code" = 124 ] || [ "$code" = 137 ] && said="cut off at its limit of $limit s (it resumes from last.pt)"
  echo "$name: $said, $(( $(date +%s) - start )) s wall" | tee -a "$out/summary.txt"
  tail -n 4 "$out/$name.log"
  return "$code"
}

one "smoke-seed$seed" "${SMOKE_S:-120}" "$@" --epochs 2 || exit
one "$gpu-seed$seed" "${RUN_S:-420}" "$@"
