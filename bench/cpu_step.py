"""The shipped model's training step on this CPU: eager, channels_last and compiled, in one process.

    PYTHONPATH=. python bench/cpu_step.py [--width 64] [--batch-size 512] [--steps 3] [--repeats 2]

Each configuration is bench/gpu_report.py's Bench (s11lib's augmentations, train_epoch, fused SGD)
at fp32, the CPU's precision: one warm-up step (the compile, for the compiled ones), then `repeats`
timed runs of `steps` steps. Prints seconds per step and the speed-up over eager contiguous. This
is how the reference run's --compile true was chosen (results/cpu-reference-v1/README.md).
"""
from __future__ import annotations

import argparse
import sys
import types

import torch

from s11lib.device import onednn_nhwc_hazards
from s11lib.models import resnet18

import gpu_report  # bench/gpu_report.py: bench/ is sys.path[0] for a script

CONFIGURATIONS = (("contiguous", "eager"), ("channels_last", "eager"), ("contiguous", "compiled"),
                  ("channels_last", "compiled"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile-backend", default="inductor", help="'eager' for a smoke test (tests/test_bench.py)")
    args = parser.parse_args(argv)
    if onednn_nhwc_hazards(resnet18(width=args.width)):
        parser.error(f"--width {args.width}: channels_last meets oneDNN#6035 on the CPU (s11lib/device.py); "
                     "use --width 16 or more")
    bench_args = types.SimpleNamespace(width=args.width, batch_size=args.batch_size, steps=args.steps,
                                       compile_backend=args.compile_backend)
    cpu = torch.device("cpu")
    print(f"ResNet18 width {args.width}, batch {args.batch_size}, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.repeats} x {args.steps} steps after one warm-up step")
    print("| layout | mode | s/step (each repeat) | speed-up |\n|---|---|---|---:|")
    base = None
    for layout, mode in CONFIGURATIONS:
        bench = gpu_report.Bench(bench_args, cpu, "off", layout, mode)
        bench.epoch(1)  # the compile, for the compiled ones
        times = [bench.epoch(args.steps) / args.steps for _ in range(args.repeats)]
        best = min(times)
        base = base or best
        print(f"| {layout} | {mode} | {', '.join(f'{t:.2f}' for t in times)} | {base / best:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
