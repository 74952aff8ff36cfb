"""The training loop: same as a plain loop, ReduceLROnPlateau really acts, a short real run learns,
and checkpoints load safely (bad input: test_bad_input.py; crashes and resume: test_resume.py).
How run() wires the parts, each checked by what it does: the rate of every warm-up step, the
plateau watching its metric in that metric's direction, best.pt chosen on validation, and
gradcam.npz holding best.pt's Grad-CAM for its own predictions."""
import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from s11lib.config import Config
from s11lib.loaders import DeviceLoader, load_cifar10
from s11lib.models import resnet18
from s11lib.optim import make_optimizer
from s11lib.run import read_metrics, run
from s11lib.transforms import test_transforms, train_transforms
from s11lib.utils.gradcam import GradCAM
from s11lib.utils.train_test import (DIVERGED_FACTOR, DivergedError, NonFiniteLossError, check_not_diverged, evaluate,
                                     train_epoch)


def _tiny_setup(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = resnet18(width=4)
    return images, labels, model


def test_train_epoch_equals_a_plain_loop():
    images, labels, model = _tiny_setup()
    reference = copy.deepcopy(model)
    config = Config(optimizer="sgd", lr=0.05, weight_decay=5e-4, batch_size=16)
    assert config.peak_lr == pytest.approx(0.05 * 16 / 512)
    loader = DeviceLoader(images, labels, 16, test_transforms())
    result = train_epoch(model, loader, make_optimizer(model, config, torch.device("cpu")), nn.CrossEntropyLoss(),
                         1, torch.device("cpu"), progress=False)

    # The reference names its no-decay parameters by module type, not by make_optimizer's ndim rule.
    no_decay = [p for m in reference.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()]
    no_decay.append(reference.linear.bias)
    decay = [p for p in reference.parameters() if all(p is not q for q in no_decay)]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=config.peak_lr, momentum=0.9, nesterov=True)
    losses, hits = [], 0
    reference.train()
    for start in range(0, 64, 16):
        x = test_transforms()(images[start:start + 16])
        y = labels[start:start + 16]
        optimizer.zero_grad()
        logits = reference(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        hits += (logits.argmax(1) == y).sum().item()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert result.loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert result.correct == hits and result.total == 64


def test_evaluate_counts_every_image():
    images, labels, model = _tiny_setup(n=50)
    result, logits = evaluate(model, DeviceLoader(images, labels, 16, test_transforms()), nn.CrossEntropyLoss(),
                              torch.device("cpu"), keep_logits=True)
    with torch.no_grad():
        expected = model.eval()(test_transforms()(images))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert result.total == 50 and result.correct == (expected.argmax(1) == labels).sum().item()
    assert result.loss == pytest.approx(nn.functional.cross_entropy(expected, labels).item(), rel=1e-5)


def test_non_finite_loss_names_epoch_and_batch():
    images, labels, model = _tiny_setup()
    calls = []

    def explodes_on_third_batch(logits, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 7, batch 3"):
        train_epoch(model, DeviceLoader(images, labels, 16, test_transforms()),
                    torch.optim.SGD(model.parameters(), lr=0.01), explodes_on_third_batch, 7, torch.device("cpu"),
                    progress=False)



def test_a_finite_blow_up_is_a_divergence_at_ten_times_a_uniform_guess():
    chance = math.log(10)
    check_not_diverged(DIVERGED_FACTOR * chance * (1 - 1e-9), 4, 10)  # at the bound: trains on
    check_not_diverged(2.0, 4, 10)
    with pytest.raises(DivergedError, match=r"^training diverged at epoch 4: its mean loss 5\.466e\+05 is over 10 "
                       r"times a uniform guess's \(2\.30\); lower lr$"):
        check_not_diverged(546572.3, 4, 10)  # the reference run's epoch 4
    with pytest.raises(DivergedError, match="diverged at epoch 2"):
        check_not_diverged(DIVERGED_FACTOR * math.log(100) * 1.001, 2, 100)  # the bound follows the classes
    check_not_diverged(DIVERGED_FACTOR * math.log(10) * 1.5, 2, 100)
    assert issubclass(NonFiniteLossError, DivergedError)  # what catches one catches both

def _quick(data_dir, out_dir, **overrides) -> Config:
    values = dict(device="cpu", data_dir=str(data_dir), out_dir=str(out_dir), download=False, width=4, epochs=2,
                  batch_size=32, train_subset=96, val_size=32, test_subset=40, progress=False,
                  num_misclassified=5)
    values.update(overrides)
    return Config(**values)


@pytest.mark.parametrize("metric, mode", [("val_loss", "min"), ("val_acc", "max")])
def test_plateau_lowers_the_lr_inside_the_training_loop(data_dir, tmp_path, metric, mode):
    # An LR this small leaves the watched metric flat: every epoch after the first is a plateau.
    # metrics.csv's lr is the LR the epoch trained with; the scheduler acts at the epoch's end.
    config = _quick(data_dir, tmp_path, epochs=4, lr=1e-6, warmup_epochs=0, plateau_metric=metric,
                    plateau_patience=0, plateau_factor=0.5, min_lr=0)
    rows = run(config).rows
    lrs = [r["lr"] / config.peak_lr for r in rows]
    assert lrs == pytest.approx([1, 1, 0.5, 0.25])
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["scheduler"]["mode"] == mode == config.plateau_mode
    assert read_metrics(tmp_path / "metrics.csv") == rows


def test_patience_waits_before_lowering(data_dir, tmp_path):
    config = _quick(data_dir, tmp_path, epochs=5, lr=1e-6, warmup_epochs=1, warmup_min_steps=0, plateau_patience=1,
                    plateau_metric="val_loss", min_lr=0)
    lrs = [r["lr"] / config.peak_lr for r in run(config).rows]
    # After epoch 1 (warm-up) no scheduler step; 2 sets the best; 3 is one bad epoch (= patience);
    # 4 is the second, so the LR drops for epoch 5.
    assert lrs == pytest.approx([1, 1, 1, 1, 0.2])


def _script_scores(monkeypatch, config: Config, **script: list[dict]) -> list[dict]:
    """Make run()'s evaluations of each epoch report scripted scores, and keep what they evaluated.

    `script` maps each split ("val" and "test") to one dict of EpochResult fields per epoch
    (`correct` out of the split's images, `loss`); the splits are told apart by their sizes. Everything
    else is real: the training, and the pass over best.pt that explains the mistakes. For runs
    without a weight average (one pass per split and epoch). Returns, for each validation pass, a
    copy of the weights it evaluated."""
    import s11lib.run as run_module

    split_of = {config.val_size: "val", config.test_subset: "test"}
    assert len(split_of) == 2, "the splits must differ in size to be told apart"
    real, calls, validated = run_module.evaluate, {"val": 0, "test": 0}, []

    def scripted(model, loader, *args, **kwargs):
        result, logits = real(model, loader, *args, **kwargs)
        if kwargs.get("keep_logits"):  # explain()'s pass over best.pt: its real scores
            return result, logits
        split = split_of[result.total]
        if split == "val":
            validated.append(copy.deepcopy(model.state_dict()))
        epoch, calls[split] = calls[split], calls[split] + 1
        return dataclasses.replace(result, **script[split][epoch]), logits

    monkeypatch.setattr(run_module, "evaluate", scripted)
    return validated


@pytest.mark.parametrize("metric", ["val_loss", "val_acc"])
def test_plateau_lowers_the_rate_only_when_the_watched_metric_stops_improving(data_dir, tmp_path, monkeypatch,
                                                                              metric):
    # The watched metric improves in its own direction (loss down, accuracy up) for three epochs,
    # then gets worse in epoch 4: with patience 0 the rate drops for epoch 5. Every other score
    # zigzags, so that in either direction it stops improving by epoch 3: watching one of them, or
    # the watched one in the other direction, drops the rate for epoch 3 or 4.
    config = _quick(data_dir, tmp_path, epochs=5, warmup_epochs=0, plateau_metric=metric, plateau_patience=0,
                    plateau_factor=0.5, min_lr=0)
    improves = {"acc": [4, 8, 16, 12, 12], "loss": [2.0, 1.5, 1.0, 1.2, 1.2]}  # acc: hits out of 32 or 40
    zigzags = {"acc": [16, 8, 16, 8, 16], "loss": [1.0, 1.5, 1.0, 1.5, 1.0]}
    watched = metric.removeprefix("val_")
    val = {kind: (improves if kind == watched else zigzags)[kind] for kind in ("acc", "loss")}
    _script_scores(monkeypatch, config, val=[dict(correct=c, loss=l) for c, l in zip(val["acc"], val["loss"])],
                   test=[dict(correct=c, loss=l) for c, l in zip(zigzags["acc"], zigzags["loss"])])
    rows = run(config).rows
    assert [(r["val_acc"], r["val_loss"]) for r in rows] == [(100 * c / 32, l) for c, l in zip(val["acc"], val["loss"])]
    assert [r["lr"] / config.peak_lr for r in rows] == pytest.approx([1, 1, 1, 1, 0.5])


def _record_step_lrs(monkeypatch) -> list[float]:
    """The rate of every optimiser step run() takes, read from the optimiser as it steps."""
    import s11lib.run as run_module

    lrs, make = [], run_module.make_optimizer

    def recording(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: lrs.append([g["lr"] for g in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(run_module, "make_optimizer", recording)
    return lrs


def test_warmup_ramps_the_lr_per_step_to_the_peak(data_dir, tmp_path, monkeypatch):
    # 2 steps an epoch, warm-up 1 epoch with a floor of 3 steps: steps 1-3 ramp, 4 is at the peak.
    lrs = _record_step_lrs(monkeypatch)
    config = _quick(data_dir, tmp_path, epochs=2, lr=0.01, warmup_epochs=1, warmup_min_steps=3, train_subset=96,
                    val_size=32, batch_size=32)
    rows = run(config).rows
    peak = config.peak_lr
    assert [lr for group in lrs for lr in group[:1]] == pytest.approx([peak / 3, 2 * peak / 3, peak, peak])
    assert all(len(set(group)) == 1 for group in lrs)  # both parameter groups at the same rate
    assert rows[1]["lr"] == pytest.approx(peak)


def test_a_short_run_never_reaches_the_peak_in_a_handful_of_steps(data_dir, tmp_path, monkeypatch):
    # A warm-up of 2 epochs with the shipped floor of 100 steps, on 2 epochs of 2 steps: the epochs
    # alone would ramp over 4 steps; the floor keeps the ramp at 100, every step a little higher.
    lrs = _record_step_lrs(monkeypatch)
    config = _quick(data_dir, tmp_path, epochs=2, lr=0.1, plateau_patience=0, warmup_epochs=2)
    assert config.warmup_min_steps == 100
    run(config)
    assert [group[0] for group in lrs] == pytest.approx([config.peak_lr * k / 100 for k in (1, 2, 3, 4)])
    # The plateau scheduler is not stepped while the warm-up lasts, even with patience 0.
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scheduler"]["last_epoch"] == 0


def test_the_peak_rate_scales_linearly_with_the_batch():
    assert Config(optimizer="sgd", lr=0.1, batch_size=512).peak_lr == pytest.approx(0.1)
    assert Config(optimizer="sgd", lr=0.1, batch_size=128).peak_lr == pytest.approx(0.025)
    assert Config(optimizer="sgd", lr=0.2, batch_size=1024).peak_lr == pytest.approx(0.4)


def test_short_real_run_learns(learned_run, is_real_data):
    rows = learned_run.rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # Chance is 10%; its standard deviation is 1.3 points on 500 images, 2.1 on 200. Measured here
    # (2 CPU cores, AMD EPYC, torch 2.14.1, 2026-11-24, the shipped recipe): 30.6% on the real subset,
    # 69.5% on the synthetic one.
    assert max(r["test_acc"] for r in rows) >= (20.0 if is_real_data else 25.0), rows


def test_gradcam_npz_holds_gradcam_of_best_pt_for_its_own_predictions(learned_run, data_dir):
    # Rebuilt from best.pt and the test images alone. The stored `targets` cannot serve as the
    # reference: the run writes its predictions there whatever class its maps explain.
    out_dir = learned_run.out_dir
    best = torch.load(out_dir / "best.pt", weights_only=True)
    config = Config.from_dict(best["config"])
    model = resnet18(width=config.width).eval()
    model.load_state_dict(best["model"])
    saved = np.load(out_dir / "gradcam.npz")
    images, labels = load_cifar10(data_dir, train=False)
    indices = torch.from_numpy(saved["indices"])
    x, labels = test_transforms()(images[indices]), labels[indices]
    with torch.no_grad():
        preds = model(x).argmax(1)
    assert len(x) == config.num_misclassified and (preds != labels).all()
    with GradCAM(model, str(saved["layer"])) as cam:
        for_preds, for_labels = cam(x, preds), cam(x, labels)
    # The same computation on the same machine, maps in [0, 1]: 1e-4 is room for another batch
    # path; the true class's map (what a run explaining the labels would store) is far off.
    torch.testing.assert_close(torch.from_numpy(saved["heatmaps"]), for_preds, atol=1e-4, rtol=0)
    assert (for_labels - for_preds).abs().amax(dim=(1, 2)).min() > 0.05
    assert saved["targets"].tolist() == preds.tolist() and str(saved["layer"]) == config.gradcam_layer


def test_checkpoints_load_safely_and_hold_the_run(data_dir, tmp_path):
    config = _quick(data_dir, tmp_path, epochs=2)
    result = run(config)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert set(last) == {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "config", "metrics", "history",
                         "best", "rng"}
    assert last["ema"] is None  # no weight average in this run
    assert last["scaler"] == {}  # fp32 on the CPU: the scaler is disabled and has no state
    assert set(best) == {"model", "epoch", "config", "metrics"}  # weights to explain, not to continue
    for state in (last, best):
        assert Config.from_dict(state["config"]) == config
        resnet18(width=4).load_state_dict(state["model"])
    # An epoch's time ends when its files go to the background writer: last.pt holds the final rows.
    assert last["epoch"] == 2 and last["history"] == result.rows == read_metrics(tmp_path / "metrics.csv")
    assert last["metrics"] == last["history"][-1] and last["metrics"]["seconds"] > 0
    assert best["epoch"] == result.best_epoch == last["best"]["epoch"]
    assert best["metrics"] == {**result.rows[result.best_epoch - 1], "seconds": best["metrics"]["seconds"]}


def test_best_pt_is_the_best_epoch_on_validation_when_the_test_set_would_pick_another(data_dir, tmp_path,
                                                                                      monkeypatch):
    # Validation peaks at epoch 2, the test set at epoch 3: best.pt must hold epoch 2's weights.
    config = _quick(data_dir, tmp_path, epochs=3)
    validated = _script_scores(monkeypatch, config, val=[dict(correct=c) for c in (8, 24, 16)],  # of 32
                               test=[dict(correct=c) for c in (10, 20, 30)])  # of 40
    result = run(config)
    assert [r["val_acc"] for r in result.rows] == [25.0, 75.0, 50.0]
    assert [r["test_acc"] for r in result.rows] == [25.0, 50.0, 75.0]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert result.best_epoch == best["epoch"] == 2
    assert all(torch.equal(best["model"][k], validated[1][k]) for k in best["model"])
    assert not all(torch.equal(best["model"][k], validated[2][k]) for k in best["model"])  # epochs differ
    assert json.loads((tmp_path / "misclassified.json").read_text())["epoch"] == 2  # the model explained


def test_with_a_weight_average_best_pt_holds_the_average(data_dir, tmp_path):
    config = _quick(data_dir, tmp_path, epochs=1, ema_decay=0.5)
    result = run(config)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert result.best_epoch == 1 and last["best"]["metric"] == "ema_val_acc"
    assert all(torch.equal(best["model"][k], last["ema"][k]) for k in best["model"])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    row = read_metrics(tmp_path / "metrics.csv")[0]
    assert row["ema_val_acc"] is not None and row["ema_test_acc"] is not None
    # The figures and mistakes come from best.pt, i.e. from the average: its test accuracy is the row's.
    explained = json.loads((tmp_path / "misclassified.json").read_text())
    assert explained["test_accuracy"] == pytest.approx(row["ema_test_acc"], abs=1e-3)


# --- host reads: the GPU must not wait for the host during an epoch ----------------------------------
@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_no_host_read_per_step(amp, host_syncs):
    # Counted at the dispatcher: value reads (.item(), bool(t)) and tensors built from Python data,
    # each a sync on a GPU. fp16: the GradScaler's scale and overflow flag stay device tensors,
    # handed to the fused kernel.
    from s11lib.device import resolve_precision

    precision = resolve_precision(amp, torch.device("cpu"))
    images, labels, model = _tiny_setup(n=96, batch=16)
    optimizer = make_optimizer(model, Config(lr=0.05, batch_size=16), torch.device("cpu"))
    scaler = precision.grad_scaler(torch.device("cpu"))
    train_tf = train_transforms()

    def reads(batches: int, progress: bool) -> int:
        loader = DeviceLoader(images[: 16 * batches], labels[: 16 * batches], 16, train_tf, shuffle=True)

        def epoch():
            train_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), 1, torch.device("cpu"), precision.dtype,
                        progress=progress, scaler=scaler)
            evaluate(model, DeviceLoader(images[: 16 * batches], labels[: 16 * batches], 16, test_transforms()),
                     nn.CrossEntropyLoss(), torch.device("cpu"), precision.dtype)
        return host_syncs(torch.device("cpu"), epoch)

    reads(1, False)  # the first call makes the normalisation constants and the scaler's tensors
    assert reads(2, False) == reads(6, False) <= 6  # a few at the end of each loop, none per step
    assert reads(6, True) <= reads(6, False) + 3 * 6  # with the bar: about ten refreshes an epoch


def test_a_step_the_scaler_skips_is_no_error():
    # fp16 with a loss scale far too large: the scaled gradients overflow, the GradScaler skips the
    # steps and shrinks its scale. The loss itself is finite, so the run goes on.
    images, labels, model = _tiny_setup(n=64, batch=16)
    before = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    result = train_epoch(model, DeviceLoader(images, labels, 16, test_transforms()),
                         make_optimizer(model, Config(lr=0.05, batch_size=16), torch.device("cpu")),
                         nn.CrossEntropyLoss(), 1, torch.device("cpu"), torch.float16, progress=False, scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 36  # all four steps skipped, the scale halved each time
    assert torch.isfinite(result.step_losses).all() and result.total == 64
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


def test_one_accuracy_per_checkpoint_at_the_runs_precision(data_dir, is_real_data, tmp_path):
    # bf16 on the CPU, as a GPU from 8.0 runs: the epochs are evaluated under autocast, and so must
    # best.pt's predictions be, or misclassified.json and test_predictions.npy disagree with
    # metrics.csv about the same weights (an fp32 pass flips the images near a tie).
    import json

    from s11lib.loaders import load_cifar10
    config = Config(data_dir=str(data_dir), out_dir=str(tmp_path), download=False, device="cpu", amp="bf16", width=8,
                    epochs=2, batch_size=64, train_subset=512, val_size=64, progress=False, num_misclassified=5,
                    warmup_min_steps=0, test_subset=1000 if is_real_data else None)  # real: 16.8% in fp32, 17.0 in bf16
    result = run(config)
    best = next(r for r in read_metrics(tmp_path / "metrics.csv") if r["epoch"] == result.best_epoch)
    saved = json.loads((tmp_path / "misclassified.json").read_text())
    predictions = np.load(tmp_path / "test_predictions.npy")
    _, test_labels = load_cifar10(data_dir, train=False, download=False)
    right = 100 * (predictions == test_labels[:len(predictions)].numpy()).mean()
    assert saved["test_accuracy"] == pytest.approx(best["test_acc"], abs=1e-4)
    assert right == pytest.approx(best["test_acc"], abs=1e-4)
