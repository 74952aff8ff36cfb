"""A torchsummary-style model table: each leaf layer, its output shape and parameter count."""
from __future__ import annotations

import torch
from torch import nn


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
