"""Checkpoints: what `last.pt` and `best.pt` hold, how they load safely, and how a run resumes.

`last.pt` is the source of truth of a run in progress. It is written at the end of every epoch,
before anything else, and holds everything the next epoch depends on: the model, optimizer and
scheduler states, the GradScaler's (an fp16 run's loss scale), the random number generators (torch
on the CPU and on the run's CUDA device, numpy, Python's `random`), the metrics of every epoch so
far and the best epoch so far. A run started again with the same `out_dir` loads it and continues
as if it had never stopped; on the CPU the result is bit for bit that of an uninterrupted run
(tests/test_resume.py).

`best.pt` holds the model weights of the best epoch (no optimizer: it is for explaining, not for
continuing); in a run with a weight average (`ema_decay`), the average's weights, which last.pt
keeps under "ema" beside the raw ones. The epoch loop writes last.pt, then best.pt, then
metrics.csv, each atomically, so a crash between two of them leaves either files that agree or a
best.pt one epoch behind last.pt, which `repair_best` rewrites from last.pt. The three are written
by a background thread while the next epoch trains (`last_state` copies what they hold to host
memory first, so training cannot change it mid-write; one epoch's writes are in flight at a time,
and the run waits for them before the next epoch's and before it ends). A crash at any moment
therefore leaves the last epoch whose writes completed, at worst one epoch less than when the
writes blocked training. In a data-parallel run
rank 0 alone writes them, and alone reads them back (s11lib/distributed.py).

Every checkpoint is read with `torch.load(..., weights_only=True)`: tensors, numbers, strings and
containers only, so a crafted file cannot run code. Anything unreadable, foreign or from a run
with other settings is a one-line `CheckpointError`.
"""
from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from s11lib.config import Config
from s11lib.optim import load_optimizer_state
from s11lib.utils import atomic

LAST, BEST = "last.pt", "best.pt"
BEST_KEYS = frozenset({"model", "epoch", "config", "metrics"})
LAST_KEYS = BEST_KEYS | {"optimizer", "scheduler", "scaler", "ema", "history", "best", "rng"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, or cannot be continued with these settings."""


def rng_state(device: torch.device) -> dict:
    """Every random number generator a run on `device` draws from, in a form weights_only loading
    accepts. Of the CUDA generators only the run device's: the others' draws do not shape the run.
    (In a data-parallel run every rank draws alike, so rank 0's states are every rank's.)"""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    # A run moved from one machine to another keeps its CPU streams; its CUDA stream comes back
    # on whichever CUDA device it continues on, and a run moved to or from the CPU starts that
    # device's stream afresh (the shuffle then differs: not bit-exact, still correct).
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def last_state(model: nn.Module, optimizer, scheduler, scaler, average, epoch: int, config: Config,
               history: list[dict], best_epoch: int, best_value: float, best_metric: str,
               device: torch.device) -> dict:
    """What last.pt holds, as a copy in host memory that nothing the run does later can change.
    `scaler`: the GradScaler (its state is empty when disabled); `average`: the WeightAverage, or None.

    A state_dict's tensors are the parameters and momentum buffers themselves, which the next
    epoch updates in place: each is copied (from a GPU, to the CPU), so that a background write
    stores this epoch's values, whole."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "ema": average.state_dict() if average is not None else None,
             "epoch": epoch,
             "config": config.to_dict(), "metrics": dict(history[-1]),
             "history": [dict(row) for row in history],
             "best": {"epoch": best_epoch, "value": best_value, "metric": best_metric}, "rng": rng_state(device)}
    return to_host(state)


def to_host(obj):
    """`obj` with every tensor copied to the CPU (detached, never aliased) and every container rebuilt;
    other values are kept as they are (numbers and strings cannot change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(value) for value in obj)
    return copy.deepcopy(obj)


def save_last(path: Path, *args, **kwargs) -> dict:
    """Write last.pt (atomically) now and return what was written; the arguments are `last_state`'s."""
    state = last_state(*args, **kwargs)
    atomic.save_torch(state, path)
    return state


def save_best(path: Path, last: dict) -> None:
    """Write best.pt from a last.pt state: the weights of that epoch (the average's, if the run keeps
    one), its metrics and config."""
    state = {key: last[key] for key in BEST_KEYS}
    if last.get("ema") is not None:
        state["model"] = last["ema"]
    atomic.save_torch(state, path)


def load_checkpoint(path: str | os.PathLike, required=BEST_KEYS, map_location=None) -> dict:
    """torch.load with weights_only=True; a failure or a missing key in `required` is a one-line CheckpointError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "not loadable"
        raise CheckpointError(f"{path} cannot be loaded safely ({_reason(e)}); delete it or use another out_dir") \
            from None
    missing = sorted(set(required) - set(state)) if isinstance(state, dict) else sorted(required)
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this s11lib version (no {', '.join(missing)})")
    return state


def _reason(error: Exception) -> str:
    """The informative line of torch.load's many-paragraph errors, as one short clause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [line for line in lines if not line.startswith(boilerplate)] or lines or [type(error).__name__]
    return useful[0].split(". ")[0].rstrip(".")


def load_model_state(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} does not fit this model ({_reason(e)})") from None


# Settings that may change between a run and its continuation: where things are, how long the
# run goes on, how the same arithmetic is scheduled (compile, memory layout), and what is drawn
# after training. Everything else shapes the training trajectory.
RESUMABLE_CHANGES = frozenset({"data_dir", "download", "device", "out_dir", "epochs", "progress", "gradcam_layer",
                               "num_misclassified", "resume", "compile", "channels_last"})


def incompatible_settings(saved: dict, config: Config) -> list[str]:
    """The settings that differ between a saved run and `config` and forbid continuing it."""
    current = config.to_dict()
    return [f"{key} {saved.get(key)!r} (now {current[key]!r})" for key in current
            if key not in RESUMABLE_CHANGES and saved.get(key) != current[key]]


@dataclass
class ResumePoint:
    """Where a run stopped, as read from out_dir: everything rank 0 of a data-parallel run sends to
    the others (s11lib/distributed.py), so only it ever reads out_dir."""

    last: dict  # the last.pt state, on the CPU
    best_epoch: int
    best_value: float
    rows: list[dict]
    best_on_disk: int | None  # the epoch best.pt holds, None when there is no best.pt
    path: Path  # of last.pt, for messages

    @property
    def epoch(self) -> int:
        return self.last["epoch"]

    def load_into(self, model: nn.Module, optimizer, scheduler, scaler, average=None) -> None:
        """Load the states of last.pt into model, optimizer, scheduler, GradScaler and weight average
        (None: the run keeps none); one that does not fit is a CheckpointError."""
        load_model_state(model, self.last, self.path)
        try:
            load_optimizer_state(optimizer, self.last["optimizer"])
            scheduler.load_state_dict(self.last["scheduler"])
            if self.last["scaler"]:  # empty: saved with the scaler disabled (bf16 or fp32), nothing to restore
                scaler.load_state_dict(self.last["scaler"])
            if average is not None:
                average.load_state_dict(self.last["ema"])
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: optimizer, scheduler, scaler or weight-average state does not fit "
                                  f"({_reason(e)})") from None


def read_resume_point(out_dir: Path, config: Config) -> ResumePoint | None:
    """Read out_dir's last.pt (and check its best.pt) for continuing with `config`; None when there
    is no last.pt.

    Writes nothing: every problem (unloadable file, other settings, more epochs done than asked)
    is raised before the run touches out_dir. Then `ResumePoint.load_into` the run's objects,
    `set_rng_state(point.last["rng"], ...)`, and `repair_best`.
    """
    path = out_dir / LAST
    if not path.is_file():
        return None
    # On the CPU whatever the device: the RNG states must be CPU tensors, and load_state_dict
    # copies weights and optimizer state to where the parameters are.
    last = load_checkpoint(path, LAST_KEYS, map_location="cpu")
    differences = incompatible_settings(last["config"], config)
    if differences:
        raise CheckpointError(f"{out_dir} holds a run with other settings: {', '.join(differences)}; pass "
                              "resume=False to start over there, or use another out_dir")
    if last["epoch"] > config.epochs:
        raise CheckpointError(f"{out_dir} holds {last['epoch']} epochs, more than epochs={config.epochs}; raise "
                              "epochs, or pass resume=False to start over")
    if len(last["history"]) != last["epoch"]:
        raise CheckpointError(f"{path} is inconsistent: {len(last['history'])} rows of metrics for "
                              f"epoch {last['epoch']}")
    best_on_disk = None  # a crafted best.pt fails now, not after training
    if (out_dir / BEST).exists():
        best_on_disk = load_checkpoint(out_dir / BEST, map_location="cpu")["epoch"]
    best = last["best"]
    if best_on_disk != best["epoch"] and best["epoch"] != last["epoch"]:  # only the newest can be missing
        raise CheckpointError(f"{out_dir / BEST} holds epoch {best_on_disk}, but {LAST} says the best is epoch "
                              f"{best['epoch']}; pass resume=False to start over")
    return ResumePoint(last, int(best["epoch"]), float(best["value"]), [dict(r) for r in last["history"]],
                       best_on_disk, path)


def repair_best(point: ResumePoint, out_dir: Path) -> None:
    """Rewrite best.pt from last.pt if the crash came before it was written."""
    if point.best_on_disk != point.best_epoch:
        save_best(out_dir / BEST, point.last)
