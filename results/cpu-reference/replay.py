"""Replay the reference run's epoch 4 from its epoch-3 weights, one line per step (issue 27).

best.pt holds epoch 3's weights but not the optimizer's momentum, so the replay starts from zero
momentum (rebuilt within about 10 steps at momentum 0.9) and a fresh batch order; it cannot repeat
the original steps, only show whether the same weights blow up again at a given rate, eagerly or
compiled, and which parameters grow first. Every step prints: the loss, the gradient's global
norm, the norms of the convolution weights, the norm layers' scales and the classifier's weights,
and the largest logit.

    .venv/bin/python results/cpu-reference/replay.py --run ~/s11-reference/run --lr 0.8 --steps 88 \
        > results/cpu-reference/replay-lr0.8-eager.txt
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from s11lib.config import Config
from s11lib.constants import NUM_CLASSES
from s11lib.loaders import build_loaders
from s11lib.models.resnet import resnet18
from s11lib.optim import make_optimizer
from s11lib.run import seed_everything
from s11lib.transforms import test_transforms, train_transforms


def group_norms(model: nn.Module) -> dict:
    sums = {"conv": 0.0, "norm_scale": 0.0, "linear": 0.0}
    for name, p in model.named_parameters():
        kind = "linear" if name.startswith("linear") else "conv" if p.ndim == 4 else \
            "norm_scale" if name.endswith("weight") else None
        if kind:
            sums[kind] += p.detach().double().pow(2).sum().item()
    return {k: math.sqrt(v) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--lr", type=float, required=True, help="the peak rate per 512 images, held constant")
    parser.add_argument("--steps", type=int, default=88)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--stop-above", type=float, default=1e3, help="stop once a step's loss exceeds this")
    args = parser.parse_args()
    values = json.loads((args.run / "config.json").read_text())
    config = Config.from_dict({**values, "lr": args.lr})
    seed_everything(config.seed + 100)  # a fresh batch order, not epoch 1's
    model = resnet18(NUM_CLASSES, width=config.width, zero_init_residual=config.zero_init_residual, init=config.init)
    best = torch.load(args.run / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    data = build_loaders(config.data_dir, config.batch_size, "cpu", train_transforms(), test_transforms(),
                         False, config.train_subset, config.test_subset, config.val_size)
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    step_model = torch.compile(model) if args.compile else model
    criterion = nn.CrossEntropyLoss()
    print(f"# best.pt epoch {best['epoch']}, peak lr {config.peak_lr} (per 512: {args.lr}), "
          f"compile {args.compile}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("step  loss        grad_norm   conv      norm_scale  linear    max_logit  seconds")
    print(f"{0:4d}  {'':10s}  {'':10s}  " + "  ".join(f"{v:8.3f}" for v in group_norms(model).values()))
    model.train()
    step = 0
    while step < args.steps:
        for x, y in data.train:
            start = time.perf_counter()
            logits = step_model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))
            optimizer.step()
            step += 1
            n = group_norms(model)
            print(f"{step:4d}  {loss.item():10.4f}  {grad:10.3f}  {n['conv']:8.3f}  {n['norm_scale']:10.3f}  "
                  f"{n['linear']:8.3f}  {logits.detach().abs().max().item():9.2f}  {time.perf_counter() - start:6.2f}",
                  flush=True)
            if not math.isfinite(loss.item()) or loss.item() > args.stop_above or step >= args.steps:
                return


if __name__ == "__main__":
    main()
