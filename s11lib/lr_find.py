"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`): train
from a tiny rate, raise it exponentially every step, and see where the loss falls fastest and
where it blows up.

    python -m s11lib.lr_find --data-dir ../shared/datasets/cifar10 --width 64 --batch-size 256
    python -m s11lib.lr_find --data-dir data --width 16 --steps 50 --plot lr_find.png

It takes every option of `python -m s11lib.run` (the model, data, batch, precision, momentum and
weight decay a run with those options would train) and the range: --start-lr, --end-lr, --steps
(100) and --plot (the picture, lr_find.png). The rates are the optimiser's own, per step, for the
given batch (not per 512, as `lr` is): the suggestion prints as both. Warm-up and the plateau
scheduler take no part: the sweep replaces them.

The suggestion is the rate where the smoothed loss falls fastest against log(rate) (torch-lr-finder's
and fastai's "steepest" point), between the first tenth of the sweep and the smoothed loss's
minimum. The sweep stops early once the smoothed loss passes 4x its minimum, or a loss is not finite.

Our own ~100 lines rather than the torch-lr-finder package: it trains with the run's own pieces
(s11lib's model, DeviceLoader batches with the GPU-side augmentations, autocast and GradScaler as
the run uses them, the fused optimiser), so the sweep measures the step a run takes, and it adds no
dependency. `lr_range_test` leaves the model and optimiser it is given as they were.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from s11lib.config import LR_REFERENCE_BATCH, Config
from s11lib.device import resolve_device, resolve_precision, safe_layout
from s11lib.optim import load_optimizer_state, make_optimizer
from s11lib.run import _fail, _parser, loaders_of, model_of, reject_unknown, seed_everything, transforms_of
from s11lib.utils.train_test import train_step

# The loss's exponential moving average, bias-corrected. fastai's 0.98 averages over ~50 steps: on
# a 100-step sweep of six decades (x1.15 a step) it lags the raw loss by ~25 steps, a factor of 30
# in rate, which moves the steepest point far to the right; 0.9 (~10 steps) lags by a factor of 2.
SMOOTHING = 0.9
DIVERGE = 4.0  # stop once the smoothed loss passes this multiple of its minimum


@dataclass
class RangeTest:
    """One sweep: each step's rate and loss, the smoothed loss, and the suggested rate."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float
    start_lr: float
    end_lr: float
    steps: int  # asked for; len(lrs) is fewer when the sweep stopped at a blow-up

    def describe(self, batch_size: int, optimizer: str = "sgd") -> str:
        """Two lines: how far the sweep went, and the suggestion per step and as the run's `lr`
        (SGD's per 512 images; Adam's and AdamW's `lr` is the rate itself, at any batch)."""
        as_lr = f"lr={self.suggestion * LR_REFERENCE_BATCH / batch_size:.3g}, the run's rate per {LR_REFERENCE_BATCH}" \
            if optimizer == "sgd" else f"lr={self.suggestion:.3g} for {optimizer}, at any batch size"
        return (f"swept {len(self.lrs)} of {self.steps} steps from {self.start_lr:g} to {self.lrs[-1]:.3g}"
                + (" (stopped: the loss blew up)" if len(self.lrs) < self.steps else "") + "\n"
                f"suggested rate: {self.suggestion:.3g} at batch {batch_size} "
                f"({as_lr})")

    def plot(self, path: str | Path, title: str = "") -> None:
        """The loss against the rate (log scale), raw and smoothed, the suggestion marked."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from s11lib.utils.atomic import save_figure

        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(self.lrs, self.losses, color="0.75", lw=1, label="loss per step")
        ax.plot(self.lrs, self.smoothed, color="C0", lw=2, label=f"smoothed (EMA {SMOOTHING})")
        ax.axvline(self.suggestion, color="C3", ls="--", lw=1.2, label=f"suggestion {self.suggestion:.3g}")
        ax.set_xscale("log")
        # From just under the lowest smoothed loss to a little above where it started: the blow-up
        # at the end leaves the picture, the part that decides stays readable.
        low, start = self.smoothed.min(), self.smoothed[: int(np.argmin(self.smoothed)) + 1].max()
        ax.set_ylim(low - 0.15 * (start - low) - 0.02, start + 0.6 * (start - low) + 0.05)
        ax.set(xlabel="learning rate (per step, this batch size)", ylabel="training loss",
               title=title or "Learning-rate range test")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3, which="both")
        save_figure(fig, path, dpi=120, bbox_inches="tight")
        plt.close(fig)


def _check_range(start_lr: float, end_lr: float, steps: int) -> None:
    if not (isinstance(start_lr, (int, float)) and start_lr > 0 and math.isfinite(start_lr)):
        raise ValueError(f"start_lr must be a positive number, got {start_lr!r}")
    if not (isinstance(end_lr, (int, float)) and end_lr > start_lr and math.isfinite(end_lr)):
        raise ValueError(f"end_lr must be a number above start_lr={start_lr:g}, got {end_lr!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 10:
        raise ValueError(f"steps must be an integer of at least 10, got {steps!r}")


def smooth(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """The bias-corrected exponential moving average of `losses` (the first value is the first loss)."""
    out, average = np.empty(len(losses)), 0.0
    for i, value in enumerate(losses):
        average = beta * average + (1 - beta) * value
        out[i] = average / (1 - beta ** (i + 1))
    return out


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> float:
    """The rate of the steepest fall of `smoothed` against log(rate), between the first tenth of the
    sweep and the smoothed minimum; the minimum's own rate where the loss never fell."""
    lowest = int(np.argmin(smoothed))
    first = min(max(1, len(lrs) // 10), lowest)
    if lowest - first < 2:
        return float(lrs[lowest])
    slopes = np.gradient(smoothed[first:lowest + 1], np.log(lrs[first:lowest + 1]))
    return float(lrs[first + int(np.argmin(slopes))])


def lr_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device,
                  start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 100,
                  amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                  progress: bool = True) -> RangeTest:
    """Sweep the rate from `start_lr` to `end_lr`, exponentially, over `steps` optimiser steps on
    `loader`'s batches (passes repeat if it has fewer), training `model` with `optimizer` as a run
    does. The model's weights and the optimiser's state are put back afterwards, however it ends."""
    _check_range(start_lr, end_lr, steps)
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    lrs = start_lr * (end_lr / start_lr) ** (np.arange(steps) / (steps - 1))
    criterion = nn.CrossEntropyLoss()
    batches = chain.from_iterable(repeat(loader))
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        for lr in tqdm(lrs, desc="lr range test", disable=not progress):
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
            x, y = next(batches)
            _, loss = train_step(model, x, y, optimizer, criterion, device, amp_dtype, scaler)
            losses.append(loss.item())  # one host read a step: a sweep is ~100 steps
            if not math.isfinite(losses[-1]):
                losses.pop()
                break
            smoothed = smooth(np.array(losses))
            if len(losses) > 1 and smoothed[-1] > DIVERGE * smoothed.min():
                break
    finally:
        model.load_state_dict(weights)
        load_optimizer_state(optimizer, state)
        model.train(was_training)
    if len(losses) < 2:
        raise ValueError(f"the loss was not finite from the first steps at {start_lr:g}: pass a smaller start_lr")
    values = np.array(losses)
    smoothed = smooth(values)
    kept = lrs[: len(values)]
    return RangeTest(kept, values, smoothed, suggest(kept, smoothed), start_lr, end_lr, steps)


def lr_find(config: Config, start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 100,
            plot: str | Path | None = "lr_find.png") -> RangeTest:
    """The range test on the model, data and optimiser a run of `config` would train (no warm-up, no
    scheduler), its picture saved to `plot` (None: none)."""
    _check_range(start_lr, end_lr, steps)
    device = resolve_device(config.device)
    precision = resolve_precision(config.amp, device)
    precision.apply(device)
    seed_everything(config.seed)
    model = model_of(config)
    data = loaders_of(config, device, *transforms_of(config))
    model = model.to(device, memory_format=safe_layout(model, device, config.channels_last, False).memory_format)
    optimizer = make_optimizer(model, config, device)
    result = lr_range_test(model, optimizer, data.train, device, start_lr, end_lr, steps, precision.dtype,
                           precision.grad_scaler(device), config.progress)
    if plot is not None:
        result.plot(plot, title=f"Range test: width {config.width}, batch {config.batch_size}, {config.optimizer}, "
                                f"momentum {config.momentum}, weight decay {config.weight_decay:g}, {precision.name}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    parser.prog = "python -m s11lib.lr_find"
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--start-lr", type=float, default=1e-5, metavar="X", help="the first step's rate (1e-5)")
    parser.add_argument("--end-lr", type=float, default=10.0, metavar="X", help="the last step's rate (10)")
    parser.add_argument("--steps", type=int, default=100, metavar="N", help="optimiser steps in the sweep (100)")
    parser.add_argument("--plot", default="lr_find.png", metavar="PNG", help="where the picture goes (lr_find.png)")
    args, extra = parser.parse_known_args(argv)
    reject_unknown(parser, extra)
    sweep = {k: vars(args).pop(k) for k in ("start_lr", "end_lr", "steps", "plot")}
    try:
        config = Config(**vars(args))
        result = lr_find(config, **sweep)
    except ValueError as e:
        return _fail(e, 2)
    print(result.describe(config.batch_size, config.optimizer) + f"; picture: {sweep['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
