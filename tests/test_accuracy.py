"""Accuracy, confusion matrix and the misclassified picker."""
import torch
import pytest

from s11lib.utils.accuracy import accuracy, confusion_matrix, correct_count, per_class_accuracy
from s11lib.utils.misclassified import find_misclassified, mistake_titles, plot_image_grid


def test_accuracy_and_confusion_agree():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g)
    labels = torch.randint(0, 10, (500,), generator=g)
    preds = logits.argmax(1)
    cm = confusion_matrix(preds, labels, 10)
    assert cm.sum() == 500 and cm.diag().sum() == correct_count(logits, labels)
    assert accuracy(logits, labels) == pytest.approx(100 * (preds == labels).float().mean().item())
    assert cm[labels[0], preds[0]] >= 1
    for c in range(10):
        assert cm[c].sum() == (labels == c).sum()  # rows are true classes
    expected = torch.tensor([100.0 * ((preds == c) & (labels == c)).sum() / (labels == c).sum() for c in range(10)])
    torch.testing.assert_close(per_class_accuracy(cm).float(), expected)


def test_misclassified_are_wrong_and_most_confident_first():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 10, generator=g) * 3
    labels = torch.randint(0, 10, (300,), generator=g)
    m = find_misclassified(logits, labels, 20)
    assert len(m) == 20
    assert (logits[m.positions].argmax(1) == m.preds).all() and (m.preds != m.labels).all()
    assert torch.equal(labels[m.positions], m.labels)
    assert (m.confidences[:-1] >= m.confidences[1:]).all()
    probs = logits.softmax(1)
    wrong = probs.argmax(1) != labels
    # No wrong image outside the 20 was more confident than the least confident one picked.
    assert probs.max(1).values[wrong].sort(descending=True).values[19] == pytest.approx(m.confidences[-1].item())


def test_fewer_mistakes_than_asked():
    logits = torch.eye(10)[[0, 1, 2, 3]] * 5
    labels = torch.tensor([0, 1, 9, 3])
    m = find_misclassified(logits, labels, 20)
    assert m.positions.tolist() == [2] and m.labels.tolist() == [9] and m.preds.tolist() == [2]


def test_titles_and_grid():
    m = find_misclassified(torch.eye(10)[[3]] * 5, torch.tensor([5]), 20)
    assert mistake_titles(m) == ["true: dog\npred: cat (" + f"{100 * m.confidences[0]:.0f}%)"]
    fig = plot_image_grid(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), ["a", "b", "c"])
    assert len([ax for ax in fig.axes if ax.images]) == 3
