"""Find the test images the model gets wrong, and draw them (optionally under Grad-CAM)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from s11lib.constants import CLASSES
from s11lib.transforms import to_float


@dataclass
class Mistakes:
    """Misclassified images, most confident mistake first. `positions` index the arrays given."""

    positions: torch.Tensor  # (k,) int64
    labels: torch.Tensor  # (k,) true classes
    preds: torch.Tensor  # (k,) predicted classes
    confidences: torch.Tensor  # (k,) softmax probability of the predicted class

    def __len__(self) -> int:
        return len(self.positions)


def find_misclassified(logits: torch.Tensor, labels: torch.Tensor, k: int = 20) -> Mistakes:
    """The k misclassified images the model was most sure of (ties: lower position first).

    Fewer than k come back when the model makes fewer than k mistakes.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    logits, labels = logits.detach().float().cpu(), labels.cpu()
    probs = logits.softmax(1)
    confidence, preds = probs.max(1)
    wrong = (preds != labels).nonzero().flatten()
    order = torch.sort(confidence[wrong], descending=True, stable=True).indices[:k]
    picked = wrong[order]
    return Mistakes(picked, labels[picked], preds[picked], confidence[picked])


def plot_image_grid(
    images: torch.Tensor,
    titles: list[str],
    ncols: int = 5,
    suptitle: str | None = None,
    panel_size: tuple[float, float] = (2.2, 2.5),
) -> Figure:
    """A grid of images (N, 3, H, W) uint8/[0, 1], or ready RGB arrays (N, H, W, 3), with titles;
    each panel `panel_size` inches (width, height) with its title."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        if isinstance(img, torch.Tensor):
            img = to_float(img).permute(1, 2, 0).cpu().numpy()
        ax.imshow(img.clip(0, 1), interpolation="bilinear")
        ax.set_title(titles[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def mistake_titles(mistakes: Mistakes, classes=CLASSES) -> list[str]:
    """'true: cat / pred: dog (93%)' for each mistake."""
    return [
        f"true: {classes[t]}\npred: {classes[p]} ({100 * c:.0f}%)"
        for t, p, c in zip(mistakes.labels.tolist(), mistakes.preds.tolist(), mistakes.confidences.tolist())
    ]
