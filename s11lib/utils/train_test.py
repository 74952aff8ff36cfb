"""One training epoch and one evaluation pass, the loops every run is made of.

Both keep their running sums on the device and read them back once at the end (and about ten
times per epoch for the progress bar, none without it), so the GPU is never stalled waiting for
the host. With fp16, a GradScaler scales the loss; a fused optimizer takes its scale and overflow
flag as device tensors, so the step needs no host read either (s11lib/optim.py).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
# Plain tqdm, not tqdm.auto: its text bar survives in papermill's stored outputs, a widget does not.
from tqdm import tqdm

from s11lib.utils.accuracy import correct_count


class DivergedError(RuntimeError):
    """Training diverged: its loss blew up (see `check_not_diverged`) or became NaN or infinite."""


class NonFiniteLossError(DivergedError):
    """Training produced a NaN or infinite loss."""


# An epoch whose mean training loss is this many times a uniform guess's (ln of the class count:
# 2.30 for CIFAR-10) has diverged. An untrained network sits near 1 times; in docs/recipe.md the
# steepest early climb that a run came back from peaked at 5.4 times in one step (12.45), and the
# worst epoch of the old defaults, 6 times (a loss of 14). The reference run that blew up at a
# finite loss (results/cpu-reference-v1/diverged-016e480/) reached 237,000 times its epoch.
DIVERGED_FACTOR = 10.0


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


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               criterion: Callable, device: torch.device, amp_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the batch (x, y) under autocast, with fp16's loss scaling when `scaler`
    is given; returns the logits and the loss (still on the device)."""
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
    return logits, loss


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
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EpochResult:
    """Train one pass over `loader`.

    Args:
        epoch: 1-based, for the progress bar and error messages.
        before_step: called with the batch number before each optimizer step (LR warm-up).
        after_step: called after each optimizer step (the weight average).
        progress: show a tqdm bar with the running loss, accuracy and learning rate (of this
            process's images, in a data-parallel run).
        scaler: fp16's loss scaling. A step it skips because the scaled gradients overflowed is
            no error: the scale shrinks and training goes on. The non-finite check looks at the
            loss itself, which is never scaled.
        sum_over_ranks: in a data-parallel run, sums a tensor over the ranks in place
            (s11lib/distributed.py); the result, each step's loss included, is then the whole
            batch's, the same on every rank, and a non-finite loss on any rank stops them all.
    """
    model.train()
    num_batches = len(loader)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    step_sums, step_counts = [], []  # each step's loss x images, on the device, read back once at the end
    refresh_every = max(1, num_batches // 10)  # ~10 host reads per epoch for the bar
    bar = tqdm(total=num_batches, desc=f"Epoch {epoch}", disable=not progress, leave=True)
    try:
        for batch, (x, y) in enumerate(loader):
            if before_step is not None:
                before_step(batch)
            logits, loss = train_step(model, x, y, optimizer, criterion, device, amp_dtype, scaler)
            if after_step is not None:
                after_step()
            n = len(y)
            seen += n
            step_sums.append(loss.detach().double() * n)
            step_counts.append(n)
            correct += correct_count(logits.detach(), y)
            bar.update(1)
            if progress and (batch % refresh_every == refresh_every - 1 or batch == num_batches - 1):
                sums = torch.stack(step_sums).cpu()  # one read for the check and the running loss
                _check_finite(sums, epoch)
                bar.set_postfix(loss=f"{sums.sum().item() / seen:.4f}", acc=f"{100.0 * correct.item() / seen:.2f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
    finally:
        bar.close()
    steps = len(step_sums)
    # One tensor, summed over the ranks at once and read back once: the steps' loss sums and image
    # counts, and the hits. In float64, exact for counts and for a float32 loss times a count.
    totals = torch.cat([torch.stack(step_sums) if steps else torch.zeros(0, device=device, dtype=torch.float64),
                        torch.tensor(step_counts, device=device, dtype=torch.float64), correct.double()[None]])
    if sum_over_ranks is not None:
        sum_over_ranks(totals)
    totals = totals.cpu()
    sums, counts = totals[:steps], totals[steps : 2 * steps]
    _check_finite(sums, epoch)
    total = int(counts.sum())
    return EpochResult(sums.sum().item() / max(total, 1), int(totals[-1]), total, (sums / counts).float())


def _check_finite(step_sums: torch.Tensor, epoch: int) -> None:
    finite = torch.isfinite(step_sums)
    if not finite.all():
        bad = int((~finite).nonzero()[0])
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, batch {bad + 1}; lower lr or check the data")


def check_not_diverged(loss: float, epoch: int, num_classes: int) -> None:
    """Raise DivergedError when an epoch's mean training `loss` is over DIVERGED_FACTOR times a
    uniform guess's. A blow-up need not reach inf: weights that grow by orders of magnitude give
    a huge but finite loss and a network that calls every image one class."""
    chance = math.log(num_classes)
    if loss > DIVERGED_FACTOR * chance:
        raise DivergedError(f"training diverged at epoch {epoch}: its mean loss {loss:.4g} is over "
                            f"{DIVERGED_FACTOR:g} times a uniform guess's ({chance:.2f}); lower lr")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: Callable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    keep_logits: bool = False,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[EpochResult, torch.Tensor | None]:
    """Mean loss and hits over `loader` in eval mode; optionally all logits (float32, on the CPU).

    `sum_over_ranks`: as in `train_epoch`; the result is then that of every rank's images together
    (the logits kept are this rank's).
    """
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
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
    if sum_over_ranks is not None:
        sum_over_ranks(totals)
    loss_total, hits, total = totals.tolist()
    result = EpochResult(loss_total / max(total, 1), int(hits), int(total))
    return result, (torch.cat(kept).cpu() if keep_logits else None)


def format_eval(name: str, result: EpochResult) -> str:
    """The original assignment's log line, e.g.
    'Test set: Average loss: 0.4599, Accuracy: 8450/10000 (84.50%)'."""
    return (f"{name} set: Average loss: {result.loss:.4f}, "
            f"Accuracy: {result.correct}/{result.total} ({result.accuracy:.2f}%)")

