"""The curves figure draws what a run measured: each split it evaluated, the weight average's when it kept one."""
import pytest

from s11lib.optim import Warmup
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


def test_the_lr_panel_draws_the_warm_up_per_step():
    # 4 steps an epoch, a 6-step ramp to 0.1: epoch 1's point is 0.1 * 4/6, the steps before it are not
    # in metrics.csv at all; the per-step line shows them, from the first step's 0.1/6.
    lr = plot_curves(_rows(True, False), Warmup(0.1, 6), steps_per_epoch=4).axes[2]
    epochs, ramp = lr.lines
    assert ramp.get_label() == "warm-up, per step (6 steps)"
    assert list(ramp.get_xdata()) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    assert list(ramp.get_ydata()) == pytest.approx([0.1 * k / 6 for k in range(1, 7)])
    assert len(plot_curves(_rows(True, False), Warmup(0.1, 0), steps_per_epoch=4).axes[2].lines) == 1
    assert len(plot_curves(_rows(True, False), Warmup(0.1, 100), steps_per_epoch=4).axes[2].lines[1].get_xdata()) == 12
