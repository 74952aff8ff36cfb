"""Tables of a model and a run: the torchsummary-style layer table, the closing epoch table and
the per-epoch log in the original assignment's format."""
from __future__ import annotations

import torch
from torch import nn

from s11lib.utils.train_test import EpochResult, format_eval


def model_summary(model: nn.Module, input_size=(3, 32, 32), device: torch.device | str = "cpu") -> str:
    """Run one dummy image through `model` and return the table as text (hooks are removed after)."""
    rows: list[tuple[str, str, int]] = []
    handles = []

    def hook(name):
        def record(module, inputs, output):
            shape = [-1, *output.shape[1:]] if isinstance(output, torch.Tensor) else "?"
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append((f"{type(module).__name__}-{len(rows) + 1} ({name})", str(list(shape)), params))
        return record

    for name, module in model.named_modules():
        if not list(module.children()):  # leaves only, as torchsummary prints them
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    width = max(len(r[0]) for r in rows) + 2
    line = "-" * (width + 40)
    out = [line, f"{'Layer (type)':<{width}}{'Output Shape':>25}{'Param #':>15}", "=" * len(line)]
    out += [f"{n:<{width}}{s:>25}{p:>15,}" for n, s, p in rows]
    out += ["=" * len(line), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)


def epoch_table(rows: list[dict]) -> str:
    """metrics.csv as the run's closing table: a line per epoch with its rate, training loss and
    accuracy, validation and test accuracy (and the weight average's, when the run kept one), seconds."""
    averaged = rows[0]["ema_test_acc"] is not None if rows else False
    lines = [f"{'epoch':>5} {'lr':>9} {'train loss':>10} {'train acc':>9} {'val acc':>8} {'test loss':>9} "
             f"{'test acc':>8}"
             + (f" {'avg val':>8} {'avg test':>8}" if averaged else "") + f" {'s':>7}"]
    for r in rows:
        val = f"{r['val_acc']:8.2f}" if r["val_acc"] is not None else f"{'-':>8}"
        avg = ""
        if averaged:
            avg = (f" {r['ema_val_acc']:8.2f}" if r["ema_val_acc"] is not None else f" {'-':>8}") + \
                f" {r['ema_test_acc']:8.2f}"
        lines.append(f"{r['epoch']:>5} {r['lr']:>9.2e} {r['train_loss']:>10.4f} {r['train_acc']:>9.2f} {val} "
                     f"{r['test_loss']:>9.4f} {r['test_acc']:>8.2f}{avg} {r['seconds']:>7.1f}")
    return "\n".join(lines)


def assignment_log(rows: list[dict], test_images: int) -> str:
    """metrics.csv as the original assignment's per-epoch log: `EPOCH: n`, the epoch's training
    loss and accuracy (its mean over the epoch's steps, as the progress bar ends it), and the test
    line as the run printed it (`format_eval`). The test counts come back from metrics.csv's
    percentages, rounded to 4 decimals: exact for up to 100,000 images."""
    lines = []
    for r in rows:
        correct = round(r["test_acc"] * test_images / 100)
        lines += [f"EPOCH: {r['epoch']}",
                  f"Train: Average loss: {r['train_loss']:.4f}, Accuracy: {r['train_acc']:.2f}% "
                  f"(lr {r['lr']:.4g}, {r['seconds']:.0f} s)",
                  format_eval("Test", EpochResult(r["test_loss"], correct, test_images))]
    return "\n".join(lines)
