"""The whole assignment as one function: train the recipe, then explain its mistakes.

    from s11lib import checkpoint
from s11lib.config import Config
    from s11lib.run import run
    result = run(Config(data_dir="data", out_dir="runs/train"))

or, without Jupyter (e.g. on a GPU machine with no papermill):

    python -m s11lib.run --data-dir data --out-dir runs/train --epochs 40

`notebooks/train.ipynb` calls the same `run`. It writes OUTPUT_FILES into `out_dir`, each one
atomically. Run it again with the same `out_dir` after a crash and it continues from last.pt
(s11lib/checkpoint.py); with `resume=False` it starts over.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from s11lib import checkpoint
from s11lib.config import Config
from s11lib.constants import CLASSES, NUM_CLASSES
from s11lib.loaders import Loaders, build_loaders
from s11lib.models import resnet18
from s11lib.transforms import test_transforms, train_transforms
from s11lib.utils import atomic
from s11lib.utils.accuracy import confusion_matrix
from s11lib.utils.gradcam import GradCAM, overlay, resolve_layer
from s11lib.utils.misclassified import Mistakes, find_misclassified, mistake_titles, plot_image_grid
from s11lib.utils.plot_metrics import plot_confusion, plot_curves
from s11lib.utils.summary import model_summary
from s11lib.utils.train_test import NonFiniteLossError, evaluate, format_eval, train_epoch

OUTPUT_FILES = ("metrics.csv", "last.pt", "best.pt", "config.json", "misclassified.json", "misclassified.png",
                "gradcam.png", "gradcam.npz", "curves.png", "confusion.png", "test_predictions.npy")
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds")


@dataclass
class RunResult:
    out_dir: Path
    rows: list[dict]  # metrics.csv, one dict per epoch
    best_epoch: int
    mistakes: Mistakes  # positions index the test set as loaded (before any subset: same order)
    heatmaps: torch.Tensor  # (k, 32, 32) Grad-CAM of the mistakes, in [0, 1]
    test_predictions: np.ndarray  # best model's predicted class for every test image


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; an unavailable device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but this machine has no CUDA GPU; use device='auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def _check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"out_dir {out_dir} is not writable ({e.strerror or e})") from None


def write_metrics(rows: list[dict], path: Path) -> None:
    with atomic.atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """metrics.csv back as dicts of floats (epoch as int, empty cells as None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (None if v == "" else int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in rows]


def make_optimizer(model: nn.Module, config: Config, device: torch.device) -> torch.optim.Optimizer:
    # foreach/fused: one kernel launch over all parameters instead of one per tensor.
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                           weight_decay=config.weight_decay, **kind)


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=config.plateau_mode, factor=config.plateau_factor, patience=config.plateau_patience,
        threshold=config.plateau_threshold, min_lr=config.min_lr)


def run(config: Config) -> RunResult:
    """Train (or continue training), checkpoint, then find and explain the mistakes of the best checkpoint.

    With `config.resume` and a last.pt in out_dir, the run continues from it. Every bad input
    (config, device, data, Grad-CAM layer, out_dir, an unloadable or foreign checkpoint) fails
    before the first file is written.
    """
    device = resolve_device(config.device)
    amp_dtype = torch.bfloat16 if (config.amp and device.type == "cuda") else None
    seed_everything(config.seed)
    model = resnet18(NUM_CLASSES, width=config.width)
    resolve_layer(model, config.gradcam_layer)  # an unknown layer fails now, not after 40 epochs
    train_tf, test_tf = train_transforms(), test_transforms()
    data: Loaders = build_loaders(config.data_dir, config.batch_size, device, train_tf, test_tf, config.download,
                                  config.train_subset, config.test_subset, config.val_size)
    model = model.to(device)
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config)
    out_dir = Path(config.out_dir)
    resumed = checkpoint.resume_point(out_dir, config, model, optimizer, scheduler) if config.resume else None
    _check_writable(out_dir)
    with atomic.exclusive(out_dir):
        atomic.remove_leftovers(out_dir)
        if resumed:
            checkpoint.restore(resumed, out_dir)
        else:
            stale = [out_dir / name for name in OUTPUT_FILES if (out_dir / name).exists()]
            for path in stale:  # a fresh start must not leave another run's best.pt or figures behind
                path.unlink()
            if stale:
                print(f"resume=False: starting over in {out_dir} (removed the previous run's files)")
        atomic.save_json(config.to_dict(), out_dir / "config.json")
        print(model_summary(model, device=device))
        held_out = f"{data.val.num_images} validation" if data.val else "no validation (the test set is watched)"
        print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch {torch.__version__}, amp: {amp_dtype or 'off'}")
        print(f"data: {data.train.num_images} training, {held_out}, {data.test.num_images} test images")
        print(f"train transforms: {train_tf}")
        sys.stdout.flush()  # before the progress bars on stderr: a notebook then shows the two in order
        rows, best_epoch = _train(model, data, optimizer, scheduler, config, device, amp_dtype, out_dir, resumed)
        return explain(model, data, config, device, out_dir, rows, best_epoch)


def _train(model, data: Loaders, optimizer, scheduler, config: Config, device, amp_dtype, out_dir: Path,
           resumed: checkpoint.ResumePoint | None) -> tuple[list[dict], int]:
    """The epoch loop, from the first epoch or from where `resumed` stopped; returns (rows, best epoch)."""
    train_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    eval_loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = len(data.train)
    warmup_steps = config.warmup_epochs * steps_per_epoch
    watched = config.plateau_metric if data.val else config.plateau_metric.replace("val_", "test_")
    select_on = "val_acc" if data.val else "test_acc"

    rows: list[dict] = resumed.rows if resumed else []
    best_epoch, best_acc = (resumed.best_epoch, resumed.best_value) if resumed else (0, -1.0)
    if resumed:
        write_metrics(rows, out_dir / "metrics.csv")  # a crash may have come before it was written
        print(f"resuming from {out_dir / checkpoint.LAST}: {resumed.epoch} of {config.epochs} epochs done, "
              f"best {select_on} {best_acc:.2f}% at epoch {best_epoch}")
    for epoch in range(len(rows) + 1, config.epochs + 1):
        start = time.perf_counter()

        def warm_up(batch: int, epoch=epoch) -> None:
            step = (epoch - 1) * steps_per_epoch + batch
            if step < warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * (step + 1) / warmup_steps

        train = train_epoch(model, data.train, optimizer, train_loss_fn, epoch, device, amp_dtype,
                            warm_up if warmup_steps else None, config.progress)
        val, _ = evaluate(model, data.val, eval_loss_fn, device, amp_dtype) if data.val else (None, None)
        test, _ = evaluate(model, data.test, eval_loss_fn, device, amp_dtype)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],  # the LR this epoch trained with
               "train_loss": round(train.loss, 6), "train_acc": round(train.accuracy, 4),
               "val_loss": round(val.loss, 6) if val else None, "val_acc": round(val.accuracy, 4) if val else None,
               "test_loss": round(test.loss, 6), "test_acc": round(test.accuracy, 4)}
        if epoch > config.warmup_epochs:
            scheduler.step(row[watched])
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
        if val:
            print(format_eval("Validation", val))
        print(format_eval("Test", test))

        improved = row[select_on] > best_acc
        if improved:
            best_epoch, best_acc = epoch, row[select_on]
        # last.pt first: it alone decides where a resumed run starts (see s11lib/checkpoint.py).
        last = checkpoint.save_last(out_dir / checkpoint.LAST, model, optimizer, scheduler, epoch, config, rows,
                                    best_epoch, best_acc, select_on)
        if improved:
            checkpoint.save_best(out_dir / checkpoint.BEST, last)
        write_metrics(rows, out_dir / "metrics.csv")
    print(f"best checkpoint: epoch {best_epoch} ({select_on} {best_acc:.2f}%)")
    return rows, best_epoch


def explain(model: nn.Module, data: Loaders, config: Config, device: torch.device, out_dir: Path,
            rows: list[dict], best_epoch: int) -> RunResult:
    """Load best.pt, predict the test set, and write the mistakes, their Grad-CAM and the figures."""
    best_path = out_dir / checkpoint.BEST
    checkpoint.load_model_state(model, checkpoint.load_checkpoint(best_path, map_location=device), best_path)
    test_result, logits = evaluate(model, data.test, nn.CrossEntropyLoss(), device, None, keep_logits=True)
    labels = data.test.labels.cpu()
    preds = logits.argmax(1)
    atomic.save_figure(plot_curves(rows), out_dir / "curves.png", dpi=90)
    confusion = confusion_matrix(preds, labels, NUM_CLASSES)
    atomic.save_figure(plot_confusion(confusion, title=f"Confusion matrix, test set, epoch {best_epoch}"),
                       out_dir / "confusion.png", dpi=90)
    with atomic.atomic_open(out_dir / "test_predictions.npy", "wb") as f:
        np.save(f, preds.numpy().astype(np.int64))

    mistakes = find_misclassified(logits, labels, config.num_misclassified)
    indices = data.test.indices[mistakes.positions]
    atomic.save_json({
        "checkpoint": "best.pt", "epoch": best_epoch,
        "test_accuracy": round(test_result.accuracy, 4), "test_images": test_result.total,
        "misclassified": [
            {"index": int(i), "label": int(t), "pred": int(p), "confidence": round(float(c), 6),
             "label_name": CLASSES[t], "pred_name": CLASSES[p]}
            for i, t, p, c in zip(indices.tolist(), mistakes.labels.tolist(), mistakes.preds.tolist(),
                                  mistakes.confidences.tolist())],
    }, out_dir / "misclassified.json")
    raw = data.test.images[mistakes.positions.to(device)]
    titles = mistake_titles(mistakes)
    atomic.save_figure(plot_image_grid(raw, titles, suptitle=f"{len(mistakes)} misclassified test images "
                                       f"(most confident first, best.pt, epoch {best_epoch})"),
                       out_dir / "misclassified.png", dpi=90)

    with GradCAM(model, config.gradcam_layer) as cam:
        heatmaps = cam(data.test.transform(raw), mistakes.preds.to(device)).cpu()
    overlays = [overlay(img, h) for img, h in zip(raw.cpu(), heatmaps)]
    atomic.save_figure(plot_image_grid(overlays, titles, suptitle=f"Grad-CAM ({config.gradcam_layer}) for the "
                                       "predicted class, same images"), out_dir / "gradcam.png", dpi=90)
    atomic.save_npz(out_dir / "gradcam.npz", heatmaps=heatmaps.numpy().astype(np.float32),
                    indices=indices.numpy(), targets=mistakes.preds.numpy(), labels=mistakes.labels.numpy(),
                    layer=np.array(config.gradcam_layer))
    print(format_eval("Test", test_result) + f"  <- best.pt (epoch {best_epoch})")
    print(f"wrote {', '.join(sorted(p.name for p in out_dir.iterdir() if not p.name.startswith('.')))} to {out_dir}")
    return RunResult(out_dir, rows, best_epoch, mistakes, heatmaps, preds.numpy())


def _parse_value(text: str, annotation: str):
    if text.lower() == "none" and "None" in annotation:
        return None
    if annotation.startswith("bool"):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if annotation.startswith("int"):
        return int(text)
    if annotation.startswith("float"):
        return float(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s11lib.run", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        parse = functools.partial(_parse_value, annotation=str(f.type))
        parse.__name__ = str(f.type)  # argparse names the type in its errors: "invalid int value"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, type=parse,
                            help=f"{f.type}, default: {f.default}")
    args = parser.parse_args(argv)
    try:
        run(Config(**vars(args)))
    except ValueError as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:  # the run diverged; last.pt still holds the last good epoch
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
