"""The recipe study: candidate recipes trained on CPU-sized proxies of the real run, in one process.

    python bench/recipe.py --data-dir ../shared/datasets/cifar10 --study stability
    python bench/recipe.py --data-dir ../shared/datasets/cifar10 --study short --results docs/recipe-runs.jsonl
    python bench/recipe.py --data-dir ../shared/datasets/cifar10 --study long \
        --candidates "base,base+label_smoothing=0.1"

Every candidate is a full recipe: RECIPE_BASE with a few fields changed, so a row means the same
thing whatever the library's defaults are when the study is rerun (`shipped` is the exception:
the defaults of the checkout, to show that they are the row that was chosen). Each (candidate,
seed) is a real `s11lib.run.run` on a proxy of the 40-epoch run:

* stability: width 32, batch 512, 9,000 training images, 4 epochs (68 steps) and a 20-step warm-up:
  the issue's probe of the first steps at the real batch size.
* stability-warm: the same at 8 epochs (136 steps) with the warm-up the library would use there
  (2 epochs of 17 steps, so the 100-step floor): do the peak rates chosen on the batch-64 proxy hold
  at batch 512?
* short: width 16, batch 64, 5,000 training images (78 steps an epoch, as the real run's 88 at
  batch 512), 2,000 held out, 12 epochs: what acts early (initialisation, decay groups, peak rate,
  warm-up).
* long: the same, 40 epochs: what acts late (label smoothing, weight averaging, the plateau's
  factor and patience), and the final comparison.
* full-width: the real width (64) at batch 128, 6,000 training images, 4 epochs (184 steps, the
  100-step warm-up among them): does the rate chosen at width 16 hold at the real width?
* full: no proxy, the real run's shape for one epoch: width 64, the full data (45,000 training,
  5,000 validation, 10,000 test), at batch 256, the batch of the assignment's log.
* full-half: the same with the first 27,500 training images (22,500 trained on, 5,000 held out):
  the first half of a full epoch, 88 steps at the real per-step shape, scored on the full test set.

`--results FILE` appends each finished run as a JSON line and reuses the lines it finds (same
proxy, candidate, recipe and seed), so a study that dies part way continues where it stopped and
the table can be reprinted without training. The table: the final epoch's validation accuracy
and loss (mean over seeds, each seed in brackets), the final test accuracy, the best validation
accuracy, the weight average's final validation accuracy (runs with ema_decay), the early rise
(the highest of the first 100 step losses over the first one), the number of loss spikes (a step
above SPIKE_RATIO x the median of the SPIKE_WINDOW steps before it) and collapses (a final
validation accuracy under 15%, or one class taking more than 60% of best.pt's test predictions).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from s11lib.config import Config
from s11lib.provenance import cpu_name
from s11lib.run import run
from s11lib.utils.train_test import DivergedError

SPIKE_WINDOW, SPIKE_RATIO = 20, 1.25
COLLAPSE_ACC, COLLAPSE_SHARE = 15.0, 0.6

# The recipe fields a candidate may set; everything else (data, width, epochs, batch) is the proxy's.
RECIPE_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "decay_norm_and_bias", "label_smoothing", "crop_prob",
                 "rotate_prob", "cutout_prob", "warmup_epochs", "warmup_min_steps", "plateau_metric", "plateau_factor",
                 "plateau_patience", "plateau_threshold", "min_lr", "zero_init_residual", "init", "ema_decay")

# Config fields added after the first records: what those runs trained with.
ADDED_FIELDS = dict(optimizer="sgd", crop_prob=1.0, rotate_prob=1.0, cutout_prob=1.0)

# The defaults before issue 10: PyTorch's layer initialisation, weight decay on every parameter, a
# warm-up of 2 epochs however short they are. (Their lr, 0.1, was then the rate at any batch size;
# the proxies here scale it linearly, as the library now does, which is kinder to it at batch 64.)
TODAY = dict(**ADDED_FIELDS, lr=0.1, momentum=0.9, weight_decay=5e-4, decay_norm_and_bias=True, label_smoothing=0.0,
             warmup_epochs=2, warmup_min_steps=0, plateau_metric="val_acc", plateau_factor=0.2, plateau_patience=2,
             plateau_threshold=1e-3, min_lr=1e-5, zero_init_residual=False, init="torch", ema_decay=0.0)
# The three initialisation and decay items of issue 10 on top of TODAY, with the warm-up floor.
RECIPE_BASE = {**TODAY, "decay_norm_and_bias": False, "warmup_min_steps": 100, "zero_init_residual": True,
               "init": "kaiming"}

# Named recipes; a candidate is a name with fields changed, e.g. "base+lr=0.4+label_smoothing=0.1".
CANDIDATES: dict[str, tuple[str, dict]] = {
    "today": ("the defaults before this study", TODAY),
    "base": ("Kaiming init, zero-init last norm, no decay on norms and biases, warm-up floor", RECIPE_BASE),
    "shipped": ("this checkout's Config defaults", {}),
    # The assignment's own log (43.3% test after epoch 1): SGD 0.01 at batch 256 (lr is per 512 here),
    # momentum 0.9 (Nesterov in s11lib), no weight decay, no warm-up, PyTorch's initialisation.
    "seed": ("the assignment's optimiser: SGD 0.01 at batch 256, momentum 0.9, no decay or warm-up, PyTorch's init",
             {**TODAY, "lr": 0.02, "weight_decay": 0.0, "warmup_epochs": 0, "warmup_min_steps": 0}),
    # Issue 37's choice at full scale: He init with zero-initialised branches, the range test's rate
    # at full width, no warm-up; weight decay 5e-4 off norms and biases; the plateau after 2 flat epochs.
    "full-scale": ("the full-scale study's recipe: SGD 0.087 per 512 from the range test, He init, zero-init, "
                   "no warm-up, wd 5e-4 off norms and biases, plateau patience 1",
                   {**RECIPE_BASE, "lr": 0.087, "warmup_epochs": 0, "plateau_patience": 1}),
    # Issue 37's second choice, on 3 full epochs against "full-scale"'s (docs/recipe.md): Adam at the
    # course's 1e-3 with L2 1e-4, each augmentation on half the images, the same init and schedule.
    "full-scale-adam": ("Adam 1e-3 with L2 1e-4, each augmentation on half the images; He init, zero-init, "
                        "no warm-up, plateau patience 1",
                        {**RECIPE_BASE, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "crop_prob": 0.5,
                         "rotate_prob": 0.5, "cutout_prob": 0.5, "warmup_epochs": 0, "plateau_patience": 1}),
}

# The fields of a proxy (its shape); the command line can override each one.
PROXY_FIELDS = ("width", "batch_size", "train_subset", "val_size", "test_subset", "epochs")
PROXY_SHAPES = {
    "stability": dict(width=32, batch_size=512, train_subset=10_000, val_size=1_000, test_subset=1_000, epochs=4),
    "stability-warm": dict(width=32, batch_size=512, train_subset=10_000, val_size=1_000, test_subset=1_000,
                           epochs=8),
    "short": dict(width=16, batch_size=64, train_subset=7_000, val_size=2_000, test_subset=2_000, epochs=12),
    "long": dict(width=16, batch_size=64, train_subset=7_000, val_size=2_000, test_subset=2_000, epochs=40),
    "full-width": dict(width=64, batch_size=128, train_subset=7_000, val_size=1_000, test_subset=1_000, epochs=4),
    "full": dict(width=64, batch_size=256, train_subset=None, val_size=5_000, test_subset=None, epochs=1),
    "full-half": dict(width=64, batch_size=256, train_subset=27_500, val_size=5_000, test_subset=None, epochs=1),
}
# Recipe fields a proxy fixes for every candidate: the stability probe's short warm-up.
PROXY_RECIPE = {"stability": dict(warmup_epochs=1, warmup_min_steps=20)}
STUDIES = {
    "stability": ["today", "base", "base+zero_init_residual=False", "today+lr=0.4", "base+lr=0.4", "base+lr=0.8"],
    "stability-warm": ["base+lr=0.4", "base+lr=0.8", "base+lr=1.6"],
    "short": ["today", "base", "base+init=torch", "base+zero_init_residual=False", "base+decay_norm_and_bias=True",
              "base+lr=0.05", "base+lr=0.2", "base+lr=0.4", "base+warmup_epochs=0", "base+warmup_epochs=1",
              "base+warmup_epochs=4"],
    "long": ["today", "base"],
    "full-width": ["base+lr=0.8"],
    "full": ["seed"],
    "full-half": ["seed", "seed+init=kaiming+zero_init_residual=True", "seed+lr=0.005",
                  "seed+optimizer=adam+lr=0.001+weight_decay=0.0001",
                  "seed+init=kaiming+zero_init_residual=True+optimizer=adam+lr=0.001+weight_decay=0.0001",
                  "seed+init=kaiming+zero_init_residual=True+lr=0.087",
                  "seed+init=kaiming+zero_init_residual=True+lr=0.087+rotate_prob=0.5+cutout_prob=0.5"],
}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


def recipe_of(candidate: str) -> dict:
    """A candidate's recipe fields: a named recipe ("shipped": the Config defaults) with the
    "+field=value" changes that follow its name applied."""
    name, *changes = candidate.split("+")
    if name not in CANDIDATES:
        raise ValueError(f"unknown recipe {name!r} in {candidate!r}; known: {', '.join(CANDIDATES)}")
    if name == "shipped":
        defaults = Config()
        recipe = {field: getattr(defaults, field) for field in RECIPE_FIELDS}
    else:
        recipe = dict(CANDIDATES[name][1])
    for change in changes:
        field, _, text = change.partition("=")
        if field not in RECIPE_FIELDS or not text:
            raise ValueError(f"{change!r} in {candidate!r} is not FIELD=VALUE with FIELD one of {RECIPE_FIELDS}")
        kind = str(_FIELD_TYPES[field])
        recipe[field] = (text == "True" if kind == "bool" else int(text) if kind == "int"
                         else float(text) if kind == "float" else text)
    return recipe


def spike_ratios(step_losses: torch.Tensor, window: int = SPIKE_WINDOW) -> torch.Tensor:
    """Each step's loss over the median of the `window` steps before it (from step `window` on)."""
    losses = step_losses.double()
    if len(losses) <= window:
        return torch.zeros(0, dtype=torch.float64)
    medians = losses.unfold(0, window, 1)[:-1].median(dim=1).values  # the window before each later step
    return losses[window:] / medians.clamp_min(1e-12)


def spikes(step_losses: torch.Tensor, window: int = SPIKE_WINDOW, ratio: float = SPIKE_RATIO) -> tuple[int, float]:
    """(how many steps lie above `ratio` x the median of the `window` steps before them, the largest such ratio)."""
    ratios = spike_ratios(step_losses, window)
    if len(ratios) == 0:
        return 0, 0.0
    return int((ratios > ratio).sum()), float(ratios.max())


def early_rise(first_steps: list[float]) -> float:
    """How far the loss climbed above its first step's within the first steps (1.0: it never did).

    A run that blows up right after the start (the loss rising from 2.3 to 3 or more, then
    sinking back to chance) shows here; the spike count's window is too short to see it."""
    return max(first_steps) / first_steps[0]


def train_one(config: Config) -> dict:
    """One run of the library on a proxy; its figures for the table (the run's log is swallowed)."""
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            result = run(config)
    except DivergedError as e:  # NaN, inf or a finite blow-up
        return {"diverged": str(e), "seconds": round(time.perf_counter() - start, 1)}
    last = result.rows[-1]
    share = float(np.bincount(result.test_predictions, minlength=10).max() / len(result.test_predictions))
    count, worst = spikes(result.step_losses)
    ratios = spike_ratios(result.step_losses)
    where = (ratios > SPIKE_RATIO).nonzero().flatten() + SPIKE_WINDOW
    return {
        "final_val_acc": last["val_acc"], "final_val_loss": last["val_loss"], "final_test_acc": last["test_acc"],
        "best_val_acc": max(r["val_acc"] for r in result.rows), "final_train_loss": last["train_loss"],
        "final_lr": last["lr"], "spikes": count, "worst_spike": round(worst, 3),
        "max_class_share": round(share, 3),
        "collapsed": bool(last["val_acc"] < COLLAPSE_ACC or share > COLLAPSE_SHARE),
        "first_steps": [round(v, 4) for v in result.step_losses[:100].tolist()],
        # Where the spikes were (0-based step, its loss, the ratio), and each epoch's rate and scores:
        # when the plateau cut the rate, and what the run looked like then.
        "spike_steps": [[int(i), round(float(result.step_losses[i]), 4), round(float(ratios[i - SPIKE_WINDOW]), 3)]
                        for i in where.tolist()],
        "history": [{k: row[k] for k in ("epoch", "lr", "train_loss", "val_acc", "val_loss", "ema_val_acc")}
                    for row in result.rows],
        "seconds": round(time.perf_counter() - start, 1),
    }


def _commit() -> str:
    """The checkout's commit, and "+library-changes" when s11lib/ differs from it: which library
    code a row ran (changes elsewhere, to docs or tests, do not change a run)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "s11lib"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+library-changes" if changed else "")


def _machine() -> str:
    """The CPU's model name and its count of cores ("AMD EPYC, 2 cores")."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def _key(record: dict) -> tuple:
    return (record["proxy"], record["candidate"], json.dumps(record["config"], sort_keys=True))


def load_results(path: Path | None) -> dict[tuple, dict]:
    if path is None or not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:  # the runs from before these fields trained at what they now default to
        for field, value in ADDED_FIELDS.items():
            record["config"].setdefault(field, value)
    return {_key(r): r for r in records}


def _fmt(values: list[float], spec: str = ".2f") -> str:
    """The mean, and each seed's value in brackets."""
    if not values:
        return "-"
    mean = format(statistics.fmean(values), spec)
    return f"{mean} ({', '.join(format(v, spec) for v in values)})" if len(values) > 1 else mean


def table(records: list[dict], candidates: list[str]) -> str:
    header = ("| candidate | final val acc % | final val loss | final test acc % | best val acc % | average's final "
              "val acc % | early rise | spikes | collapsed | min/run |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for name in candidates:
        rows = sorted((r for r in records if r["candidate"] == name), key=lambda r: r["config"]["seed"])
        if not rows:
            continue
        done = [r["result"] for r in rows if "diverged" not in r["result"]]
        diverged = len(rows) - len(done)
        minutes = statistics.fmean(r["result"]["seconds"] for r in rows) / 60
        def column(key: str, spec: str = ".2f", done=done) -> str:
            return _fmt([r[key] for r in done], spec)

        rise = _fmt([early_rise(r["first_steps"]) for r in done], ".3g")
        averaged = [r["history"][-1]["ema_val_acc"] for r in done if r.get("history", [{}])[-1].get("ema_val_acc")]
        lines.append(
            f"| {name} | {column('final_val_acc')} | {column('final_val_loss', '.3f')} | {column('final_test_acc')} "
            f"| {column('best_val_acc')} | {_fmt(averaged)} | {rise} | {sum(r['spikes'] for r in done)} "
            f"| {sum(r['collapsed'] for r in done) + diverged} of {len(rows)}"
            f"{' (diverged)' if diverged else ''} | {minutes:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/recipe.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="the folder that holds cifar-10-batches-py/")
    parser.add_argument("--study", choices=sorted(STUDIES), default="short")
    parser.add_argument("--candidates", help="comma-separated NAME[+FIELD=VALUE...] (default: the study's), NAME "
                        "one of: " + "; ".join(f"{name} ({about})" for name, (about, _) in CANDIDATES.items()))
    parser.add_argument("--seeds", default="0,1", help="comma-separated run seeds (default 0,1)")
    parser.add_argument("--results", type=Path, help="a JSON-lines file: finished runs are appended and reused")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    # Shrinking the proxy (tests, a quick look); a shrunk proxy is another proxy in --results.
    for name in PROXY_FIELDS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, dest=name, help=f"override the proxy's {name}")
    args = parser.parse_args(argv)

    candidates = args.candidates.split(",") if args.candidates else STUDIES[args.study]
    for candidate in candidates:
        try:
            recipe_of(candidate)
        except ValueError as e:
            parser.error(str(e))
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    shape = dict(PROXY_SHAPES[args.study])
    shape.update({k: getattr(args, k) for k in PROXY_FIELDS if getattr(args, k) is not None})
    proxy = f"{args.study}:" + ",".join(f"{k}={v}" for k, v in sorted(shape.items()))
    print(f"proxy {proxy}; torch {torch.__version__} on {args.device} ({args.threads} threads), "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")

    commit = _commit()
    known = load_results(args.results)
    records, trained = [], 0
    with tempfile.TemporaryDirectory(prefix="s11-recipe-") as tmp:
        for name in candidates:
            for seed in seeds:
                recipe = {**recipe_of(name), **PROXY_RECIPE.get(args.study, {})}
                config = Config(data_dir=args.data_dir, download=False, device=args.device, progress=False,
                                resume=False, out_dir=str(Path(tmp) / "run"), num_misclassified=5, seed=seed,
                                **shape, **recipe)
                saved = {k: v for k, v in dataclasses.asdict(config).items()
                         if k not in ("data_dir", "out_dir", "device", "progress", "resume")}
                record = {"proxy": proxy, "candidate": name, "config": saved}
                if _key(record) in known:
                    records.append(known[_key(record)])
                    continue
                record["result"] = train_one(config)
                record.update(torch=torch.__version__, threads=args.threads, date=time.strftime("%Y-%m-%d"),
                              commit=commit, machine=_machine(), command=" ".join(["python bench/recipe.py",
                                                                                     *sys.argv[1:]]))
                trained += 1
                records.append(record)
                res = record["result"]
                print(f"{name} seed {seed}: " + (res["diverged"] if "diverged" in res else
                      f"val {res['final_val_acc']:.2f}% (best {res['best_val_acc']:.2f}%), test "
                      f"{res['final_test_acc']:.2f}%, spikes {res['spikes']}, collapsed {res['collapsed']}")
                      + f", {res['seconds'] / 60:.1f} min", flush=True)
                if args.results:
                    with args.results.open("a") as f:
                        f.write(json.dumps(record) + "\n")
    print(f"\n{trained} runs trained, {len(records) - trained} reused from {args.results}\n")
    print(table(records, candidates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
