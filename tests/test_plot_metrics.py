"""The curves figure draws what a run measured: each split it evaluated, the weight average's when it kept one."""
import pytest

from s11lib.utils.plot_metrics import plot_curves


def _rows(val: bool, ema: bool) -> list[dict]:
    rows = []
    for epoch in (1, 2, 3):
        row = {"epoch": epoch, "lr": 0.1 / epoch, "train_loss": 2.0 / epoch, "train_acc": 30.0 * epoch,
               "test_loss": 2.1 / epoch, "test_acc": 28.0 * epoch}
        row.update(val_loss=2.2 / epoch if val else None, val_acc=27.0 * epoch if val else None)
        for split in ("ema_val", "ema_test"):
            has = ema and (val or split == "ema_test")
            row.update({f"{split}_loss": 1.9 / epoch if has else None, f"{split}_acc": 31.0 * epoch if has else None})
        rows.append(row)
    return rows


@pytest.mark.parametrize("val, ema, labels", [
    (True, False, ["train", "val", "test"]),
    (False, False, ["train", "test"]),
    (True, True, ["train", "val", "test", "val, weight average", "test, weight average"]),
    (False, True, ["train", "test", "test, weight average"]),
])
def test_curves_show_each_measured_split(val, ema, labels):
    fig = plot_curves(_rows(val, ema))
    loss, acc, lr = fig.axes
    assert [line.get_label() for line in loss.lines] == labels == [line.get_label() for line in acc.lines]
    test = next(line for line in acc.lines if line.get_label() == "test")
    assert list(test.get_ydata()) == [28.0, 56.0, 84.0]
    assert list(lr.lines[0].get_ydata()) == pytest.approx([0.1, 0.05, 0.1 / 3])
