"""How far torch.compile'd training steps drift from eager ones on this CPU: the figures behind the
tolerances of tests/test_compile.py::test_compiled_training_steps_match_eager.

    PYTHONPATH=. python bench/compile_drift.py [--seeds 0,1,2] [--threads 1,2] [--steps 3] [--width 16]

Two comparisons, each the largest relative difference of a step's loss and the largest absolute
difference of a parameter element after the last step (the weights are of order 0.01 to 1):
* trajectory: both sides train `steps` steps on their own; rounding differences compound;
* per step: before each step the compiled side gets the eager side's weights and momentum, so each
  figure is one step's rounding alone. The test compares this way, within a tolerance above it.
Each seed and thread count runs in a child process (torch fixes its thread count per process);
ONEDNN_MAX_CPU_ISA=AVX2 in the environment runs the kernels of a CPU without AVX-512.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

BATCH = 16


def steps_both_ways(seed: int, steps: int, width: int) -> dict:
    import torch
    from torch import nn

    from s11lib.config import Config
    from s11lib.loaders import DeviceLoader
    from s11lib.models import resnet18
    from s11lib.optim import make_optimizer
    from s11lib.transforms import test_transforms
    from s11lib.utils.train_test import train_epoch

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH * steps, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (BATCH * steps,), generator=g)
    config = Config(lr=0.2, batch_size=BATCH)
    loss_fn = nn.CrossEntropyLoss()

    def step(model, step_model, optimizer, k):
        batch = DeviceLoader(images[k * BATCH:(k + 1) * BATCH], labels[k * BATCH:(k + 1) * BATCH], BATCH,
                             test_transforms())
        return train_epoch(step_model, batch, optimizer, loss_fn, 1, cpu, progress=False).step_losses[0].item()

    torch.manual_seed(seed)
    start = resnet18(width=width)
    out = {}
    for name, sync in (("trajectory", False), ("per_step", True)):
        eager, compiled = copy.deepcopy(start), copy.deepcopy(start)
        opt_e, opt_c = make_optimizer(eager, config, cpu), make_optimizer(compiled, config, cpu)
        step_c = torch.compile(compiled)
        loss_diff = 0.0
        for k in range(steps):
            if sync:
                compiled.load_state_dict(eager.state_dict())
                opt_c.load_state_dict(copy.deepcopy(opt_e.state_dict()))  # not aliased buffers
            le, lc = step(eager, eager, opt_e, k), step(compiled, step_c, opt_c, k)
            loss_diff = max(loss_diff, abs(lc - le) / abs(le))
        param_diff = max((p - q).abs().max().item() for p, q in zip(eager.parameters(), compiled.parameters()))
        out[name] = {"loss_rel": loss_diff, "param_abs": param_diff}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=16, help="below 16 meets oneDNN#6035 (s11lib/device.py)")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch
        torch.set_num_threads(args.child[1])
        print(json.dumps(steps_both_ways(args.child[0], args.steps, args.width)))
        return 0
    print(f"ResNet18 width {args.width}, batch {BATCH}, {args.steps} steps; ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(default)')}")
    print("| seed | threads | trajectory: loss (rel) | params (abs) | per step: loss (rel) | params (abs) |\n"
          "|---|---|---|---|---|---|")
    worst = {(k, m): 0.0 for k in ("trajectory", "per_step") for m in ("loss_rel", "param_abs")}
    for seed in map(int, args.seeds.split(",")):
        for threads in map(int, args.threads.split(",")):
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--width", str(args.width),
                                   "--child", str(seed), str(threads)], capture_output=True, text=True, timeout=600)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            r = json.loads(done.stdout.splitlines()[-1])
            print(f"| {seed} | {threads} | {r['trajectory']['loss_rel']:.2e} | {r['trajectory']['param_abs']:.2e} | "
                  f"{r['per_step']['loss_rel']:.2e} | {r['per_step']['param_abs']:.2e} |", flush=True)
            for k, m in worst:
                worst[k, m] = max(worst[k, m], r[k][m])
    print("largest: " + ", ".join(f"{k} {m} {v:.2e}" for (k, m), v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
