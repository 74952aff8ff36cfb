"""Figures of a run's history: loss and accuracy per epoch, the learning rate, the confusion matrix;
and of several runs side by side (a sweep's: s11lib/compare.py)."""
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


def plot_curves(rows: list[dict], warmup=None, steps_per_epoch: int | None = None) -> Figure:
    """Three panels from metrics rows (as in metrics.csv): loss, accuracy (train/val/test, and the
    weight average's val/test when the run kept one, dashed), and lr.

    metrics.csv has one rate per epoch (its last step's); given the run's `warmup` (s11lib.optim.Warmup)
    and `steps_per_epoch`, the lr panel also draws the warm-up's rate at every step, which the epochs'
    points alone hide (a 2-epoch ramp is two points)."""
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
    ax_lr.plot(epochs, _series(rows, "lr"), "-o", ms=3, color="tab:purple", label="each epoch's last step")
    if warmup is not None and warmup.steps and steps_per_epoch:
        steps = range(min(warmup.steps, len(rows) * steps_per_epoch))
        ax_lr.plot([(k + 1) / steps_per_epoch for k in steps], [warmup.lr(k) for k in steps], "-", lw=1,
                   color="tab:orange", label=f"warm-up, per step ({warmup.steps} steps)")
        ax_lr.legend()
    ax_lr.set(title="Learning rate", xlabel="epoch", yscale="log")
    for ax in (ax_loss, ax_acc, ax_lr):
        _epoch_axis(ax)
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


def _epoch_axis(ax) -> None:
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colours(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


def plot_runs_overlaid(groups: dict[str, list[list[dict]]], title: str) -> Figure:
    """Several runs' curves on four panels (training loss, validation and test accuracy, learning
    rate): a colour per group, a line per run. `groups` maps each group's legend to the metrics
    rows (as in metrics.csv) of each of its runs."""
    panels = (("train_loss", "Training loss", None), ("val_acc", "Validation accuracy", "%"),
              ("test_acc", "Test accuracy", "%"), ("lr", "Learning rate the epoch trained with", None))
    fig = Figure(figsize=(13, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for (legend, runs), colour in zip(groups.items(), _colours(len(groups))):
        for i, rows in enumerate(runs):
            epochs = [row["epoch"] for row in rows]
            for ax, (column, _, _) in zip(axes, panels):
                ax.plot(epochs, _series(rows, column), "-", color=colour, alpha=0.75, lw=1.3,
                        label=legend if i == 0 else None)
    for ax, (column, heading, unit) in zip(axes, panels):
        ax.set(title=heading, xlabel="epoch", ylabel=unit or "")
        if column == "lr":
            ax.set_yscale("log")
        _epoch_axis(ax)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_class_accuracy(groups: dict[str, np.ndarray], title: str) -> Figure:
    """Accuracy per class, groups side by side: each group's mean over its runs as a bar, their
    standard deviation as an error bar. `groups` maps each group's legend to a (runs, classes)
    array of percentages."""
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(groups)
    x = np.arange(len(CLASSES))
    for k, ((legend, values), colour) in enumerate(zip(groups.items(), _colours(len(groups)))):
        errors = values.std(0, ddof=1) if len(values) > 1 else None
        ax.bar(x + (k - (len(groups) - 1) / 2) * width, values.mean(0), width, yerr=errors, capsize=2,
               color=colour, label=legend)
    ax.set_xticks(x, CLASSES)
    ax.set(ylabel="% of the class right", ylim=(0, 100), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_reliability(calibration, title: str = "Reliability diagram") -> Figure:
    """A reliability diagram from a calibration's bins (s11lib.explore.calibration or anything with
    its fields: edges, counts, confidence, accuracy, ece, wrong_confidences): the accuracy of each
    confidence bin against the diagonal of perfect calibration, the gap shaded, the share of images
    per bin below, and the mistakes' confidences marked as ticks along the bottom."""
    edges = np.asarray(calibration.edges, dtype=float)
    counts = np.asarray(calibration.counts, dtype=float)
    accuracy = np.asarray(calibration.accuracy, dtype=float)
    confidence = np.asarray(calibration.confidence, dtype=float)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = Figure(figsize=(6.5, 6.5), layout="constrained")
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = counts > 0
    ax.bar(centres[filled], accuracy[filled], width=width[filled], color="#4c72b0", edgecolor="white",
           label="accuracy of the bin")
    ax.bar(centres[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width[filled],
           color="#dd8452", alpha=0.45, edgecolor="#dd8452", label="gap to its mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    wrong = np.asarray(calibration.wrong_confidences, dtype=float)
    ax.plot(wrong, np.full(len(wrong), 0.01), "|", color="#c44e52", ms=12, alpha=0.6,
            label=f"a mistake's confidence ({len(wrong)})")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
           title=f"{title}: ECE {100 * calibration.ece:.2f}% ({len(counts)} equal-width bins)")
    ax.legend(loc="upper left", fontsize=8)
    total = max(counts.sum(), 1.0)
    ax_count.bar(centres, counts / total, width=width, color="#8c8c8c", edgecolor="white")
    ax_count.set(xlabel="confidence (the top class's probability)", ylabel="share of images")
    return fig
