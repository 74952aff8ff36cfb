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
    """The run's optimiser over `param_groups`, at its peak rate: SGD with Nesterov momentum, Adam
    (weight decay as L2 in the gradient, as the course's solutions used it) or AdamW (decoupled
    decay); for Adam and AdamW `momentum` is the first beta, the second is PyTorch's 0.999.

    Fused where the device has the kernel (CUDA and the CPU, in the torch 2.5 and later s11lib needs), else foreach:
    one kernel over all parameters instead of one per tensor. The fused kernel also takes a
    GradScaler's scale and overflow flag as tensors, so an fp16 step needs no host read.

    SGD's momentum buffers are created as zeros now. Left to the first step, the fused kernel makes
    them with `empty_like`, and when a GradScaler skips that first step for an overflow it returns
    before writing them: step 2 would then start from uninitialised memory. A zero buffer gives the
    same first step as a missing one (buffer = grad, as dampening is 0). Adam's fused kernel
    creates its state with zeros, and a skipped step leaves it so.
    """
    groups = param_groups(model, config.weight_decay, config.decay_norm_and_bias)
    if config.optimizer == "sgd":
        kind, options = torch.optim.SGD, dict(momentum=config.momentum, nesterov=config.momentum > 0)
    else:
        kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        options = dict(betas=(config.momentum, 0.999))
    try:
        optimizer = kind(groups, lr=config.peak_lr, **options, fused=True)
    except RuntimeError:  # no fused kernel for this device type (or dtype)
        optimizer = kind(groups, lr=config.peak_lr, **options, foreach=True)
    if config.optimizer == "sgd" and config.momentum > 0:
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping this optimizer's kernel choice.

    load_state_dict restores each group's saved `fused` and `foreach` flags: a run saved on a GPU
    and resumed on the CPU (or the reverse) would step with the other device's kernel, and an
    optimizer built fused that gets foreach flags fails a GradScaler's step with an AssertionError.
    """
    kernels = {key: optimizer.defaults.get(key) for key in ("fused", "foreach")}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(kernels)
        for param in group["params"]:
            # A buffer comes back in the memory layout it was saved in; a run continued with the
            # other `channels_last` setting needs it in its parameter's, element for element.
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param).copy_(value)


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
