"""The optimiser, its learning-rate schedule (warm-up, then plateau) and the weight average.

The schedule of a run, per step:

* a linear warm-up from peak_lr / W to peak_lr over the first W steps, where
  W = max(warmup_epochs * steps_per_epoch, warmup_min_steps): the floor keeps a short run (a few
  steps an epoch) from reaching the peak rate in a handful of steps, which is how the earlier
  defaults blew up (docs/recipe.md);
* then ReduceLROnPlateau, stepped at the end of each epoch that was trained wholly after the
  warm-up (an epoch of ramping rates says nothing about a plateau).

`peak_lr` is `Config.lr` scaled linearly from a batch of 512 to the run's batch size.

With `ema_decay` > 0 a run also keeps `WeightAverage`, an exponential moving average of the
weights, evaluated beside them each epoch (s11lib/run.py says which of the two each decision watches).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from s11lib.config import Config


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Two optimiser groups: weights that are decayed, and those that are not.

    Norm scales and shifts and biases (every parameter with fewer than 2 dimensions) get no weight
    decay unless `decay_norm_and_bias`: pulling a norm's scale towards 0 shrinks the layer's output
    rather than regularising its weights (timm's `param_groups_weight_decay`, torchvision's
    `norm_weight_decay=0.0`). Every parameter appears in exactly one group, in model order.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if decay_norm_and_bias or param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def make_optimizer(model: nn.Module, config: Config, device: torch.device) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over `param_groups`, at the run's peak rate."""
    # foreach/fused: one kernel launch over all parameters instead of one per tensor.
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    groups = param_groups(model, config.weight_decay, config.decay_norm_and_bias)
    return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum, nesterov=config.momentum > 0, **kind)


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=config.plateau_mode, factor=config.plateau_factor, patience=config.plateau_patience,
        threshold=config.plateau_threshold, min_lr=config.min_lr)


@dataclass(frozen=True)
class Warmup:
    """The linear ramp of the first `steps` optimiser steps of a run (0: no warm-up)."""

    peak_lr: float
    steps: int

    @classmethod
    def of(cls, config: Config, steps_per_epoch: int) -> "Warmup":
        if config.warmup_epochs == 0:
            return cls(config.peak_lr, 0)
        return cls(config.peak_lr, max(config.warmup_epochs * steps_per_epoch, config.warmup_min_steps))

    def lr(self, step: int) -> float | None:
        """The rate of the 0-based optimiser step `step`, or None once the warm-up is over."""
        return self.peak_lr * (step + 1) / self.steps if step < self.steps else None

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every group's rate for `step`; after the warm-up leave them to the plateau scheduler."""
        lr = self.lr(step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def over_after(self, steps_done: int) -> bool:
        """Whether the warm-up is over once `steps_done` steps have been taken."""
        return steps_done >= self.steps


class WeightAverage:
    """An exponential moving average of a model's weights: after each optimiser step,
    average <- decay * average + (1 - decay) * weights, starting from the initial weights.

    With decay d it averages roughly the last 1 / (1 - d) steps (0.99: about an epoch of the real
    run). One foreach lerp over all tensors and no host read per step (torch's AveragedModel reads
    its step counter on the host at every update, a GPU sync). The model has no BatchNorm, so the
    average needs no recomputed running statistics: it is a complete model as it stands.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._source = [*model.parameters(), *model.buffers()]
        self._average = [*self.module.parameters(), *self.module.buffers()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._average, self._source, 1 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
