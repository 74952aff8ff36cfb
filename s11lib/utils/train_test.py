"""One training epoch and one evaluation pass, the loops every run is made of.

Both keep their running sums on the device and read them back once at the end (and about ten
times per epoch for the progress bar, none without it), so the GPU is never stalled waiting for
the host. With fp16, a GradScaler scales the loss; a fused optimizer takes its scale and overflow
flag as device tensors, so the step needs no host read either (s11lib/optim.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
# Plain tqdm, not tqdm.auto: its text bar survives in papermill's stored outputs, a widget does not.
from tqdm import tqdm

from s11lib.utils.accuracy import correct_count


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclass
class EpochResult:
    loss: float  # mean loss per image
    correct: int
    total: int
    step_losses: torch.Tensor | None = None  # training only: each step's batch loss (float32, on the CPU)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on the device, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    epoch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    before_step: Callable[[int], None] | None = None,
    progress: bool = True,
    after_step: Callable[[], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochResult:
    """Train one pass over `loader`.

    Args:
        epoch: 1-based, for the progress bar and error messages.
        before_step: called with the batch number before each optimizer step (LR warm-up).
        after_step: called after each optimizer step (the weight average).
        progress: show a tqdm bar with the running loss, accuracy and learning rate.
        scaler: fp16's loss scaling. A step it skips because the scaled gradients overflowed is
            no error: the scale shrinks and training goes on. The non-finite check looks at the
            loss itself, which is never scaled.
    """
    model.train()
    num_batches = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    seen = 0
    step_losses = []  # device tensors, read back once at the end
    refresh_every = max(1, num_batches // 10)  # ~10 host reads per epoch for the bar
    bar = tqdm(total=num_batches, desc=f"Epoch {epoch}", disable=not progress, leave=True)
    try:
        for batch, (x, y) in enumerate(loader):
            if before_step is not None:
                before_step(batch)
            with autocast(device, amp_dtype):
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if after_step is not None:
                after_step()
            n = len(y)
            seen += n
            loss_det = loss.detach()
            # Remember the first non-finite batch without a host sync.
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_det), batch, first_bad)
            loss_sum += loss_det.double() * n
            step_losses.append(loss_det)
            correct += correct_count(logits.detach(), y)
            bar.update(1)
            if progress and (batch % refresh_every == refresh_every - 1 or batch == num_batches - 1):
                _check_finite(first_bad, epoch)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100.0 * correct.item() / seen:.2f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
    finally:
        bar.close()
    _check_finite(first_bad, epoch)
    losses = torch.stack(step_losses).float().cpu() if step_losses else torch.zeros(0)
    return EpochResult(loss_sum.item() / max(seen, 1), int(correct.item()), seen, losses)


def _check_finite(first_bad: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, batch {bad + 1}; lower lr or check the data")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: Callable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    keep_logits: bool = False,
) -> tuple[EpochResult, torch.Tensor | None]:
    """Mean loss and hits over `loader` in eval mode; optionally all logits (float32, on the CPU)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    kept = []
    for x, y in loader:
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += criterion(logits, y).double() * len(y)
        correct += correct_count(logits, y)
        seen += len(y)
        if keep_logits:
            kept.append(logits)
    result = EpochResult(loss_sum.item() / max(seen, 1), int(correct.item()), seen)
    return result, (torch.cat(kept).cpu() if keep_logits else None)


def format_eval(name: str, result: EpochResult) -> str:
    """The original assignment's log line, e.g.
    'Test set: Average loss: 0.4599, Accuracy: 8450/10000 (84.50%)'."""
    return (f"{name} set: Average loss: {result.loss:.4f}, "
            f"Accuracy: {result.correct}/{result.total} ({result.accuracy:.2f}%)")

