"""Accuracy, per-class accuracy and the confusion matrix: one owner for every count of right and wrong."""
from __future__ import annotations

import torch


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of top-1 hits, as a 0-d tensor on the logits' device (no host sync)."""
    return (logits.argmax(1) == labels).sum()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * correct_count(logits, labels).item() / len(labels)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Percent of each true class predicted right (NaN for a class with no images)."""
    totals = confusion.sum(1).double()
    return 100.0 * confusion.diag().double() / totals
