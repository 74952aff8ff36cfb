"""Figures of a run's history: loss and accuracy per epoch, the learning rate, the confusion matrix."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from s11lib.constants import CLASSES


def _series(rows: list[dict], key: str) -> list[float]:
    out = []
    for row in rows:
        value = row.get(key)
        out.append(float(value) if value not in (None, "") else math.nan)
    return out


def plot_curves(rows: list[dict]) -> Figure:
    """Three panels from metrics rows (as in metrics.csv): loss, accuracy (train/val/test, and the
    weight average's val/test when the run kept one, dashed), and lr."""
    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    series = (("train", "-o", "train"), ("val", "-s", "val"), ("test", "-^", "test"),
              ("ema_val", "--s", "val, weight average"), ("ema_test", "--^", "test, weight average"))
    for split, style, label in series:
        loss, acc = _series(rows, f"{split}_loss"), _series(rows, f"{split}_acc")
        if all(math.isnan(v) for v in loss):
            continue  # no validation split, or no weight average, in this run
        ax_loss.plot(epochs, loss, style, ms=3, label=label)
        ax_acc.plot(epochs, acc, style, ms=3, label=label)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy per image")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="%")
    ax_lr.plot(epochs, _series(rows, "lr"), "-o", ms=3, color="tab:purple")
    ax_lr.set(title="Learning rate the epoch trained with", xlabel="epoch", yscale="log")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend()
    ax_acc.legend()
    return fig


def plot_confusion(confusion, classes=CLASSES, title: str = "Confusion matrix") -> Figure:
    """Row-normalised confusion matrix (true class per row), with counts in each cell."""
    counts = np.asarray(confusion)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    return fig
