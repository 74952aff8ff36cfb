"""The whole assignment as one function: train the recipe, then explain its mistakes.

    from s11lib.config import Config
    from s11lib.run import run
    result = run(Config(data_dir="data", out_dir="runs/train"))

or, without Jupyter (e.g. on a GPU machine with no papermill):

    python -m s11lib.run --data-dir data --out-dir runs/train --epochs 40

or data-parallel on several GPUs or machines (s11lib/distributed.py):

    torchrun --standalone --nproc-per-node 8 -m s11lib.run --data-dir data --out-dir runs/train

`notebooks/train.ipynb` calls the same `run`. It writes OUTPUT_FILES into `out_dir`, each one
atomically. Run it again with the same `out_dir` after a crash and it continues from last.pt
(s11lib/checkpoint.py); with `resume=False` it starts over.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from s11lib import checkpoint, distributed, provenance
from s11lib.config import LR_REFERENCE_BATCH, Config, field_help
from s11lib.constants import CLASSES, NUM_CLASSES
from s11lib.device import Precision, quiet_cuda_home_note, resolve_precision, safe_layout
from s11lib.distributed import Ranks
from s11lib.loaders import Loaders, build_loaders
from s11lib.models import resnet18
from s11lib.optim import WeightAverage, Warmup, make_optimizer, make_scheduler
from s11lib.transforms import TestTransform, TrainTransform, test_transforms, train_transforms
from s11lib.utils import atomic
from s11lib.utils.accuracy import confusion_matrix
from s11lib.utils.gradcam import GradCAM, overlay, resolve_layer
from s11lib.utils.misclassified import Mistakes, find_misclassified, mistake_titles, plot_image_grid
from s11lib.utils.plot_metrics import plot_confusion, plot_curves
from s11lib.utils.summary import epoch_table, model_summary
from s11lib.utils.train_test import DivergedError, check_not_diverged, evaluate, format_eval, train_epoch

OUTPUT_FILES = ("metrics.csv", "last.pt", "best.pt", "config.json", provenance.RUN_JSON, "misclassified.json",
                "misclassified.png", "gradcam.png", "gradcam.npz", "curves.png", "confusion.png",
                "test_predictions.npy")
# What explore.ipynb adds to a finished run's folder from best.pt (s11lib/explore.py): a fresh start
# removes them with the run's own files, so no analysis of another run's best.pt stays behind.
DERIVED_FILES = ("cam_checks.json", "features.npz")
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                  "ema_val_loss", "ema_val_acc", "ema_test_loss", "ema_test_acc", "seconds")


@dataclass
class RunResult:
    out_dir: Path
    rows: list[dict]  # metrics.csv, one dict per epoch
    best_epoch: int
    mistakes: Mistakes  # positions index the test set as loaded (before any subset: same order)
    heatmaps: torch.Tensor  # (k, 32, 32) Grad-CAM of the mistakes, in [0, 1]
    test_predictions: np.ndarray  # best model's predicted class for every test image
    # The training loss of every step this call took (float32); a resumed run's earlier epochs are
    # not in it. bench/recipe.py reads it for loss spikes and collapses.
    step_losses: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def check_writable(out_dir: Path) -> None:
    """Make out_dir if needed and prove it writable: a file in its place, or no permission to write
    there, is a one-line ValueError."""
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


def run(config: Config) -> RunResult | None:
    """Train (or continue training), checkpoint, then find and explain the mistakes of the best checkpoint.

    With `config.resume` and a last.pt in out_dir, the run continues from it. Every bad input
    (config, device, data, Grad-CAM layer, out_dir, an unloadable or foreign checkpoint) fails
    before the first file is written.

    Under torchrun the processes train one model data-parallel (s11lib/distributed.py); rank 0
    writes the files, prints, explains and returns the result, the other ranks return None.
    """
    with distributed.launch(config.device, config.batch_size) as (ranks, device):
        # The other ranks print nothing: their stdout would repeat rank 0's (errors still show).
        with open(os.devnull, "w") if not ranks.is_main else contextlib.nullcontext(sys.stdout) as out, \
                contextlib.redirect_stdout(out):
            return _run(config, ranks, device)


def _run(config: Config, ranks: Ranks, device: torch.device) -> RunResult | None:
    precision = resolve_precision(config.amp, device)
    precision.apply(device)  # TF32 on or off, as the precision says (torch's default would be on)
    if device.type == "cuda":
        # cuDNN times its convolution algorithms for each new shape once and keeps the fastest: a
        # run has three or four shapes (training, evaluation, their last batches).
        torch.backends.cudnn.benchmark = True
    seed_everything(config.seed)  # the same seed on every rank: the same model and the same draws
    model = model_of(config)
    resolve_layer(model, config.gradcam_layer)  # an unknown layer fails now, not after 40 epochs
    train_tf, test_tf = transforms_of(config)
    with distributed.local_main_first(ranks):  # one download per machine
        data = loaders_of(config, device, train_tf, test_tf)
    if ranks.distributed and len(data.train) * config.batch_size > data.train.num_images:
        raise ValueError(f"{data.train.num_images} training images are fewer than one batch of {config.batch_size}: "
                         "the ranks could not share it evenly; pass a smaller batch_size or more images")
    # channels_last: the weights alone are enough, each convolution then returns NHWC (and turns
    # the 3-channel input itself). What it buys is not the whole network in NHWC: on CUDA, GroupNorm
    # has no NHWC kernel and makes its input contiguous (aten's group_norm; pytorch#111824), so each
    # convolution and norm convert the activations both ways, and only bench/gpu_report.py can say
    # whether the convolutions gain more. On the CPU, narrow models keep NCHW (device.safe_layout).
    layout = safe_layout(model, device, config.channels_last, config.compile)
    model = model.to(device, memory_format=layout.memory_format)
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config)
    scaler = precision.grad_scaler(device)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    out_dir = Path(config.out_dir)
    resumed = distributed.on_main(ranks, lambda: checkpoint.read_resume_point(out_dir, config)) \
        if config.resume else None
    if resumed:
        resumed.load_into(model, optimizer, scheduler, scaler, average)
    with contextlib.ExitStack() as claimed:  # rank 0's lock on out_dir, held to the end of the run
        record = distributed.on_main(ranks, lambda: _claim(out_dir, config, resumed, claimed, device, precision,
                                                           layout.channels_last, ranks.world_size))
        if resumed:
            checkpoint.set_rng_state(resumed.last["rng"], device)
        print(model_summary(model, device=device))
        held_out = f"{data.val.num_images} validation" if data.val else "no validation (the test set is watched)"
        print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch {torch.__version__}; precision: {precision}; compile: {config.compile}, "
              f"channels_last: {config.channels_last}")
        if layout.note:
            print(f"note: {layout.note}")
        if ranks.distributed:
            print(f"data-parallel: {ranks.world_size} processes ({torch.distributed.get_backend()}), "
                  f"{config.batch_size // ranks.world_size} of each batch of {config.batch_size} images per process")
        print(f"data: {data.train.num_images} training, {held_out}, {data.test.num_images} test images")
        print(f"train transforms: {train_tf}")
        warmup = Warmup.of(config, len(data.train))
        scaled = f" (lr {config.lr:g} x batch {config.batch_size} / {LR_REFERENCE_BATCH})" \
            if config.optimizer == "sgd" else ""
        print(f"{type(optimizer).__name__}: peak lr {config.peak_lr:.4g}{scaled}, "
              f"warm-up {warmup.steps} steps, then ReduceLROnPlateau on {_watched(config, data)}")
        sys.stdout.flush()  # before the progress bars on stderr: a notebook then shows the two in order
        # The checkpoints are written while the next epoch trains; leaving the block waits for the
        # last epoch's (a run that fails waits too, so its last whole epoch is kept).
        try:
            with _inductor_options(layout.compile_options() if config.compile else {}), \
                    atomic.BackgroundWriter("s11lib-checkpoints") as writer:
                rows, best_epoch, step_losses = _train(model, data, optimizer, scheduler, scaler, warmup, average,
                                                       config, device, precision, out_dir, resumed, writer, record,
                                                       ranks)
            if not ranks.is_main:
                return None
            result = explain(model, data, config, device, out_dir, rows, best_epoch, precision)
            result.step_losses = step_losses
            return result
        finally:  # the segment's end, however it ends (a SIGKILL leaves it open: end null)
            if ranks.is_main:
                record.end()


def model_of(config: Config) -> nn.Module:
    """The ResNet18 a run of `config` trains, freshly initialised (seed first: seed_everything)."""
    return resnet18(NUM_CLASSES, width=config.width, zero_init_residual=config.zero_init_residual, init=config.init)


def transforms_of(config: Config) -> tuple[TrainTransform, TestTransform]:
    """The training augmentations (how often each is applied: the config's) and the test transform."""
    return (train_transforms(crop_prob=config.crop_prob, rotate_prob=config.rotate_prob,
                             cutout_prob=config.cutout_prob), test_transforms())


def loaders_of(config: Config, device: torch.device, train_tf, test_tf) -> Loaders:
    """The training, validation and test batches a run of `config` uses, on `device`."""
    return build_loaders(config.data_dir, config.batch_size, device, train_tf, test_tf, config.download,
                         config.train_subset, config.test_subset, config.val_size)


def _inductor_options(options: dict) -> contextlib.AbstractContextManager:
    """torch._inductor.config patched with `options` for the compiles inside (they happen lazily,
    at the first call of each shape), or nothing at all without options."""
    if not options:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config
    return inductor_config.patch(options)


def _claim(out_dir: Path, config: Config, resumed: checkpoint.ResumePoint | None,
           claimed: contextlib.ExitStack, device: torch.device, precision: Precision, channels_last: bool,
           world_size: int) -> provenance.Record:
    """Make out_dir this run's (rank 0 only): lock it, clear what a crash or another run left, write
    config.json, and start this segment in run.json."""
    check_writable(out_dir)
    claimed.enter_context(atomic.exclusive(out_dir))
    atomic.remove_leftovers(out_dir)
    if resumed:
        checkpoint.repair_best(resumed, out_dir)
    else:
        stale = [out_dir / name for name in OUTPUT_FILES + DERIVED_FILES if (out_dir / name).exists()]
        for path in stale:  # a fresh start must not leave another run's best.pt or figures behind
            path.unlink()
        if stale and not config.resume:
            print(f"resume=False: starting over in {out_dir} (removed the previous run's files)")
        elif stale:  # a run stopped before its first epoch ended left config.json (and maybe more)
            print(f"no {checkpoint.LAST} in {out_dir} to continue from: starting the run from epoch 1 "
                  f"(removed {', '.join(sorted(p.name for p in stale))})")
    atomic.save_json(config.to_dict(), out_dir / "config.json")
    return provenance.Record.begin(out_dir, device, precision, config.compile, channels_last, world_size,
                                   resumed is not None)


def _train(model, data: Loaders, optimizer, scheduler, scaler, warmup: Warmup, average: WeightAverage | None,
           config: Config, device, precision: Precision, out_dir: Path,
           resumed: checkpoint.ResumePoint | None, writer: atomic.BackgroundWriter, record: provenance.Record,
           ranks: Ranks = Ranks()) -> tuple[list[dict], int, torch.Tensor]:
    """The epoch loop, from the first epoch or from where `resumed` stopped.

    With a weight average, both the weights and their average are evaluated each epoch. The
    plateau scheduler watches the weights: the rate moves them, and the average trails them by
    about 1 / (1 - ema_decay) steps, so a plateau would be seen late on it. best.pt is chosen on,
    and holds, the average: it is the model the run ends up explaining.

    With `config.compile`, training and evaluation run a torch.compile'd wrapper of `model`; the
    weights are the same tensors, so checkpoints hold the plain module's keys, and the weight
    average and everything after training (Grad-CAM hooks, the summary) use the eager module.

    Data-parallel (`ranks`), training runs DistributedDataParallel around that wrapper (torch's
    advice: compile the inner module), each rank on its share of every batch; evaluation runs the
    wrapper itself on each rank's share, and every figure is summed over the ranks before it is
    used, so all ranks take the same decisions. Rank 0 alone writes.

    Each epoch's files go to `writer` (a background thread) as a host copy of their state, and are
    written while the next epoch trains; `submit` waits for the previous epoch's first.

    Returns the metrics rows, the best epoch and the loss of every step this call took."""
    amp_dtype = precision.dtype
    # dynamic=None: the first shape compiles static; evaluation's smaller last batch compiles once
    # more with a dynamic batch size, which then serves every split's last batch, every epoch.
    if config.compile:
        quiet_cuda_home_note()
    step_model = torch.compile(model) if config.compile else model
    train_model = step_model
    reduce = None
    if ranks.distributed:
        train_model = DistributedDataParallel(step_model, device_ids=[device] if device.type == "cuda" else None)
        # Compiled, the shortcuts' 1x1 weight gradients come with strides that differ from their
        # parameters' only along the 1-sized dimensions: the same memory order, which DDP's check
        # (reducer.cpp) flags anyway. DDP copies every gradient into its buckets, so nothing is lost.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        reduce = distributed.sum_over_ranks
        data = Loaders(*(loader.sharded(ranks) if loader else None for loader in (data.train, data.val, data.test)))
    train_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    eval_loss_fn = nn.CrossEntropyLoss()
    evaluate_on = functools.partial(evaluate, criterion=eval_loss_fn, device=device, amp_dtype=amp_dtype,
                                    sum_over_ranks=reduce)
    steps_per_epoch = len(data.train)
    watched = _watched(config, data)
    select_on = kept_model_prefix(config) + ("val_acc" if data.val else "test_acc")

    rows: list[dict] = []
    step_losses = []
    best_epoch, best_acc = (resumed.best_epoch, resumed.best_value) if resumed else (0, -1.0)
    if resumed:
        rows = distributed.on_main(ranks, lambda: _with_written_seconds(resumed.rows, out_dir / "metrics.csv"))
        if ranks.is_main:
            write_metrics(rows, out_dir / "metrics.csv")  # a crash may have come before it was written
        print(f"resuming from {out_dir / checkpoint.LAST}: {resumed.epoch} of {config.epochs} epochs done, "
              f"best {select_on} {best_acc:.2f}% at epoch {best_epoch}")
    for epoch in range(len(rows) + 1, config.epochs + 1):
        start = time.perf_counter()

        def warm_up(batch: int, epoch=epoch) -> None:
            warmup.apply(optimizer, (epoch - 1) * steps_per_epoch + batch)

        after_warmup = warmup.over_after((epoch - 1) * steps_per_epoch)  # the whole epoch at the plateau's rate
        train = train_epoch(train_model, data.train, optimizer, train_loss_fn, epoch, device, amp_dtype,
                            None if after_warmup else warm_up, config.progress and ranks.is_main,
                            average.update if average else None, scaler, reduce)
        step_losses.append(train.step_losses)
        check_not_diverged(train.loss, epoch, NUM_CLASSES)  # before anything of this epoch is written
        val, _ = evaluate_on(step_model, data.val) if data.val else (None, None)
        test, _ = evaluate_on(step_model, data.test)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],  # the LR this epoch trained with
               "train_loss": round(train.loss, 6), "train_acc": round(train.accuracy, 4),
               **_scores("val", val), **_scores("test", test)}
        ema_val = ema_test = None
        if average:
            ema_test, _ = evaluate_on(average.module, data.test)
            if data.val:
                ema_val, _ = evaluate_on(average.module, data.val)
        row.update(**_scores("ema_val", ema_val), **_scores("ema_test", ema_test))
        if after_warmup:
            scheduler.step(row[watched])
        row["seconds"] = round(time.perf_counter() - start, 3)  # so far; the writes are added below
        rows.append(row)
        if val:
            print(format_eval("Validation", val))
        print(format_eval("Test", test))
        if average:
            if data.val:
                print(format_eval("Validation (weight average)", ema_val))
            print(format_eval("Test (weight average)", ema_test))

        improved = row[select_on] > best_acc
        if improved:
            best_epoch, best_acc = epoch, row[select_on]
        if ranks.is_main:
            # The epoch's wall time up to its hand-over to the writer; a write still running when
            # the next epoch ends (slower than an epoch) is waited for there, and counted there.
            row["seconds"] = round(time.perf_counter() - start, 3)
            last = checkpoint.last_state(model, optimizer, scheduler, scaler, average, epoch, config, rows,
                                         best_epoch, best_acc, select_on, device)
            writer.submit(write_epoch_files, out_dir, last, improved, [dict(r) for r in rows],
                          record.epoch_done(epoch))
    print(f"best checkpoint: epoch {best_epoch} ({select_on} {best_acc:.2f}%)")
    return rows, best_epoch, torch.cat(step_losses) if step_losses else torch.zeros(0)


def write_epoch_files(out_dir: Path, last: dict, improved: bool, rows: list[dict],
                      run_record: dict | None = None) -> None:
    """An epoch's files, on the writer's thread: last.pt first, since it alone decides where a
    resumed run starts, then best.pt if the epoch improved, then metrics.csv (s11lib/checkpoint.py),
    then run.json with the epoch in its segment (s11lib/provenance.py)."""
    atomic.save_torch(last, out_dir / checkpoint.LAST)
    if improved:
        checkpoint.save_best(out_dir / checkpoint.BEST, last)
    write_metrics(rows, out_dir / "metrics.csv")
    if run_record is not None:
        atomic.save_json(run_record, out_dir / provenance.RUN_JSON)


def kept_model_prefix(config: Config) -> str:
    """The prefix of the metrics.csv columns of the model a run keeps: "ema_" when it keeps a weight
    average (best.pt is then chosen on, and holds, the average), else ""."""
    return "ema_" if config.ema_decay else ""


def _with_written_seconds(rows: list[dict], path: Path) -> list[dict]:
    """last.pt's rows, each epoch's `seconds` taken from metrics.csv where it has the epoch. Today
    the two agree (an epoch's time ends when its files are handed to the writer); a run begun by
    s11lib before the background writer counted the inline writes in metrics.csv alone."""
    try:
        written = {row["epoch"]: row["seconds"] for row in read_metrics(path)}
    except (OSError, ValueError, KeyError):  # missing or torn: keep last.pt's figures
        return rows
    return [{**row, "seconds": written.get(row["epoch"]) or row["seconds"]} for row in rows]


def _scores(split: str, result) -> dict:
    """A split's loss and accuracy as metrics.csv columns (None when the split was not evaluated)."""
    return {f"{split}_loss": round(result.loss, 6) if result else None,
            f"{split}_acc": round(result.accuracy, 4) if result else None}


def _watched(config: Config, data: Loaders) -> str:
    """The metric ReduceLROnPlateau watches: the validation one, or the test one without a split."""
    return config.plateau_metric if data.val else config.plateau_metric.replace("val_", "test_")


def explain(model: nn.Module, data: Loaders, config: Config, device: torch.device, out_dir: Path,
            rows: list[dict], best_epoch: int, precision: Precision) -> RunResult:
    """Load best.pt, predict the test set, and write the mistakes, their Grad-CAM and the figures.

    The predictions are made at the run's precision, as its epochs were evaluated: one accuracy per
    checkpoint in metrics.csv, misclassified.json and a sweep's summary.csv (under bf16 an fp32 pass
    would flip the images near a tie). Grad-CAM runs in fp32."""
    best_path = out_dir / checkpoint.BEST
    checkpoint.load_model_state(model, checkpoint.load_checkpoint(best_path, map_location=device), best_path)
    test_result, logits = evaluate(model, data.test, nn.CrossEntropyLoss(), device, precision.dtype,
                                   keep_logits=True)
    labels = data.test.labels.cpu()
    preds = logits.argmax(1)
    atomic.save_figure(plot_curves(rows, Warmup.of(config, len(data.train)), len(data.train)), out_dir / "curves.png",
                       dpi=90)
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


_METAVARS = {"int": "N", "int | None": "N|none", "float": "X", "bool": "true|false"}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line (exit 2), like every other bad input."""

    def error(self, message: str):  # --help has the usage
        self.exit(2, f"error: {message}; `{self.prog} --help` lists the options\n")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m s11lib.run", description=__doc__.split("\n")[0],
                           usage="%(prog)s [--NAME VALUE ...]", allow_abbrev=False,  # --epoch is not --epochs
                           epilog="Each option is a parameter of s11lib/config.py; the notebook's papermill "
                                  "parameters have the same names with underscores. Launched by torchrun, the "
                                  "processes train data-parallel with batch_size as the global batch "
                                  "(docs/distributed.md).")
    helps = field_help()
    for f in dataclasses.fields(Config):
        parse = functools.partial(_parse_value, annotation=str(f.type))
        parse.__name__ = str(f.type)  # argparse names the type in its errors: "invalid int value"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, type=parse,
                            metavar=_METAVARS.get(str(f.type), "TEXT"),
                            help=f"{helps[f.name]} ({f.type}, default: {f.default})".replace("%", "%%"))
    return parser


def reject_unknown(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """parse_known_args' leftovers as one error line, naming the closest option (a typo's fix)."""
    if extra:
        options = [o for action in parser._actions for o in action.option_strings]
        given = extra[0].split("=", 1)[0]
        close = difflib.get_close_matches(given, options, n=1, cutoff=0.6) if given.startswith("-") else []
        parser.error(f"unknown option {given}" + (f" (did you mean {close[0]}?)" if close else "")
                     if given.startswith("-") else f"unexpected argument {given!r}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    reject_unknown(parser, extra)
    try:
        result = run(Config(**vars(args)))
        if result is not None:  # rank 0: the table train.ipynb ends with
            print(epoch_table(result.rows))
    except ValueError as e:  # bad input: one line, no traceback
        return _fail(e, 2)
    except DivergedError as e:  # last.pt still holds the last good epoch
        return _fail(e, 1)
    return 0


# How long a rank other than 0 keeps an error to itself (see _fail).
QUIET_SECONDS = 2.0


def _fail(error: Exception, code: int) -> int:
    """Print `error` in one line and return the exit status. Under torchrun, rank 0 prints at once;
    another rank first waits QUIET_SECONDS: an error every rank meets (a bad launch, bad input)
    reaches rank 0 too, which prints it, and torchrun stops the others meanwhile. So the line
    appears once, and an error of one rank alone is still printed, with the rank."""
    ranks = _ranks_or_none()
    prefix = "error"
    if ranks is not None and not ranks.is_main:
        time.sleep(QUIET_SECONDS)
        prefix = f"error (rank {ranks.rank})"
    print(f"{prefix}: {error}", file=sys.stderr)
    return code


def _ranks_or_none() -> Ranks | None:
    try:
        return Ranks.from_env()
    except ValueError:  # a broken torchrun environment: that is the error being reported
        return None


if __name__ == "__main__":
    sys.exit(main())
