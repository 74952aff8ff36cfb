"""Compare the runs of a sweep (s11lib/sweep.py): the library of notebooks/compare.ipynb.

    from s11lib.compare import load_sweep, settings_table, differences_table
    swept = load_sweep("runs/sweep")        # summary.csv, and each finished run's metrics and predictions
    print(settings_table(swept))            # mean ± standard deviation over seeds, per setting
    print(differences_table(swept))         # which differences exceed the seed-to-seed spread

A *setting* is a combination of the grid's values other than `seed`; its runs are its seeds.
Whether two settings differ by more than seed noise is Welch's t-test on their seeds' values
(means compared against the standard error that their spreads give, without assuming equal
spreads), with Holm's correction for the number of pairs compared. Its p-values come from
Student's t distribution, computed here (`t_two_sided_p`) so that no statistics package is needed.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from s11lib import provenance
from s11lib.config import Config
from s11lib.constants import CLASSES, NUM_CLASSES
from s11lib.loaders import load_cifar10
from s11lib.run import read_metrics
from s11lib.sweep import SPEC_COPY, SUMMARY, point_name, read_summary
from s11lib.utils.accuracy import confusion_matrix, per_class_accuracy
from s11lib.utils.plot_metrics import plot_class_accuracy, plot_runs_overlaid

SEED = "seed"
# summary.csv's columns that the tables show, with their headings.
MEASURES = {"best_test_acc": "best test %", "final_test_acc": "final test %", "best_val_acc": "best val %",
            "best_epoch": "best epoch", "seconds": "seconds"}


@dataclass
class SweptRun:
    """One finished run of the sweep."""

    name: str
    settings: dict  # its grid values, seed included
    summary: dict  # its row of summary.csv
    rows: list[dict]  # its metrics.csv
    per_class: np.ndarray  # (10,) best.pt's test accuracy per class, percent
    provenance: dict | None = None  # its run.json (s11lib/provenance.py); None for a run without one


@dataclass
class Sweep:
    folder: Path
    grid: dict  # name -> the list of values, as the spec gave them
    runs: list[SweptRun]  # the finished runs, in grid order
    unfinished: dict  # name -> status, of the runs that are not done

    @property
    def factors(self) -> list[str]:
        """The grid's parameters other than the seed: what a setting is made of."""
        return [name for name in self.grid if name != SEED]

    def setting(self, run: SweptRun) -> str:
        """The run's setting as text (`lr=0.4,warmup_epochs=2`), or "all runs" in a sweep of seeds only."""
        return point_name({k: run.settings[k] for k in self.factors}) if self.factors else "all runs"

    def groups(self) -> dict[str, list[SweptRun]]:
        """Setting -> its finished runs (its seeds), in grid order."""
        groups: dict[str, list[SweptRun]] = {}
        for run in self.runs:
            groups.setdefault(self.setting(run), []).append(run)
        return groups


def load_sweep(sweep_dir: str | Path, data_dir: str | Path | None = None) -> Sweep:
    """Read a sweep's folder: sweep.json, summary.csv, and each finished run's metrics.csv and
    test_predictions.npy (with the test labels, from `data_dir` or the runs' own data_dir).

    Args:
        sweep_dir: the spec's out_dir.
        data_dir: where CIFAR-10 is, for the test labels; default each run's own data_dir.
    """
    folder = Path(sweep_dir)
    if not (folder / SPEC_COPY).is_file() or not (folder / SUMMARY).is_file():
        raise ValueError(f"{folder} is not a sweep's folder (no {SPEC_COPY} or {SUMMARY}); run "
                         "`python -m s11lib.sweep SPEC.yaml` first")
    grid = json.loads((folder / SPEC_COPY).read_text())["grid"]
    settings = {point_name(dict(zip(grid, values))): dict(zip(grid, values))
                for values in itertools.product(*grid.values())}
    runs, unfinished = [], {}
    for row in read_summary(folder / SUMMARY):
        if row["status"] != "done":
            unfinished[row["run"]] = row["status"]
            continue
        run_dir = folder / row["run"]
        config = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
        predictions = torch.from_numpy(np.load(run_dir / "test_predictions.npy"))
        labels = _test_labels(str(data_dir or config.data_dir), config.test_subset, config.download)
        if len(predictions) != len(labels):
            raise ValueError(f"{run_dir}: {len(predictions)} test predictions for {len(labels)} test images in "
                             f"{data_dir or config.data_dir}")
        per_class = per_class_accuracy(confusion_matrix(predictions, labels, NUM_CLASSES)).numpy()
        runs.append(SweptRun(row["run"], settings[row["run"]], row, read_metrics(run_dir / "metrics.csv"), per_class,
                             provenance.read(run_dir)))
    return Sweep(folder, grid, runs, unfinished)


@functools.cache
def _test_labels(data_dir: str, subset: int | None, download: bool) -> torch.Tensor:
    _, labels = load_cifar10(data_dir, train=False, download=download)
    return labels[:subset] if subset is not None else labels


def describe(swept: Sweep) -> str:
    """The sweep in a few lines: what was varied, how many runs are done, which are not."""
    total = len(swept.runs) + len(swept.unfinished)
    lines = [f"{swept.folder}: {len(swept.runs)} of {total} runs done"]
    for name, values in swept.grid.items():
        lines.append(f"  {name}: {', '.join(str(v) for v in values)}")
    for name, status in swept.unfinished.items():
        lines.append(f"  not in the comparison: {name} ({status})")
    warnings = provenance_warnings(swept.runs)
    if swept.runs and not warnings:
        made = swept.runs[0].provenance["segments"][0]
        lines.append(f"  made by: commit {provenance.short(made)}, "
                     f"torch {made.get('torch')} (every run, every segment)")
    lines += [f"warning: {warning}" for warning in warnings]
    return "\n".join(lines)


def provenance_warnings(runs: list[SweptRun]) -> list[str]:
    """What makes the runs' differences partly the code's or torch's, not the settings': runs made
    by more than one commit (a dirty tree counts as its own) or torch version, over all their
    segments; and runs with no run.json, which cannot say."""
    seen: dict[str, dict[str, list[str]]] = {"commit": {}, "torch": {}}
    unknown = []
    for run in runs:
        if run.provenance is None:
            unknown.append(run.name)
            continue
        for segment in run.provenance["segments"]:
            commit = provenance.short(segment)
            for kind, value in (("commit", commit), ("torch", segment.get("torch"))):
                names = seen[kind].setdefault(str(value), [])
                if run.name not in names:
                    names.append(run.name)
    warnings = []
    for kind, values in seen.items():
        if len(values) > 1:
            what = "; ".join(f"{value}: {', '.join(names)}" for value, names in values.items())
            plural = "commits" if kind == "commit" else "torch versions"
            warnings.append(f"the runs come from {len(values)} different {plural} ({what}); part of a "
                            "difference between them may be the code's")
    if unknown:
        warnings.append(f"{len(unknown)} runs have no run.json, so what made them is unknown: {', '.join(unknown)}")
    return warnings


# --- statistics ----------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is NaN for a single value."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t distribution with `df` (> 0, not necessarily whole) degrees of
    freedom: the regularised incomplete beta function I_x(df/2, 1/2) at x = df / (df + t^2)."""
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), by its continued fraction (Numerical Recipes, 3rd ed., 6.4), evaluated with
    Lentz's method on the side of x where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


@dataclass
class Welch:
    """Welch's t-test of two sets of values: is mean(a) - mean(b) more than their spreads explain?"""

    difference: float  # mean(a) - mean(b)
    standard_error: float  # sqrt(var(a)/n_a + var(b)/n_b)
    df: float  # Welch-Satterthwaite degrees of freedom
    t: float
    p: float  # two-sided


def welch(a, b) -> Welch:
    """Welch's unequal-variances t-test; each side needs at least two values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two values on each side (two seeds per setting)")
    difference = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # every seed of both settings gave the same value
        return Welch(difference, 0.0, float(len(a) + len(b) - 2), math.inf if difference else 0.0,
                     0.0 if difference else 1.0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = difference / se
    return Welch(difference, se, float(df), t, t_two_sided_p(t, df))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: compare each adjusted p-value with alpha, and the chance of any
    false "beyond seed noise" among all the pairs stays at most alpha."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Difference:
    first: str  # a setting
    second: str
    test: Welch  # of first's seeds against second's
    p_holm: float
    beyond_noise: bool  # p_holm < alpha


def differences(swept: Sweep, metric: str = "best_test_acc", alpha: float = 0.05) -> list[Difference]:
    """Every pair of settings with at least two finished seeds each, most significant first."""
    if metric not in MEASURES:
        raise ValueError(f"metric must be one of {', '.join(MEASURES)}, got {metric!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    groups = {setting: [run.summary[metric] for run in runs] for setting, runs in swept.groups().items()}
    if any(value is None for values in groups.values() for value in values):
        raise ValueError(f"some runs have no {metric} (runs with val_size=0 have no validation accuracy); "
                         "pass another metric")
    pairs = [(a, b) for a, b in itertools.combinations(groups, 2) if len(groups[a]) > 1 and len(groups[b]) > 1]
    tests = [welch(groups[a], groups[b]) for a, b in pairs]
    adjusted = holm([t.p for t in tests])
    found = [Difference(a, b, t, p, p < alpha) for (a, b), t, p in zip(pairs, tests, adjusted)]
    return sorted(found, key=lambda d: (d.test.p, -abs(d.test.difference)))


# --- tables and figures --------------------------------------------------------------------------
def _cell(values, decimals: int = 2) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{decimals}f} ± {'-' if math.isnan(std) else f'{std:.{decimals}f}'}"


def settings_table(swept: Sweep) -> str:
    """Per setting: the number of seeds, and mean ± standard deviation over them of each MEASURE."""
    groups = swept.groups()
    width = max([len("setting"), *map(len, groups)]) + 2
    lines = [f"{'setting':<{width}}{'seeds':>5}" + "".join(f"{heading:>17}" for heading in MEASURES.values())]
    for setting, runs in groups.items():
        cells = []
        for measure in MEASURES:
            values = [run.summary[measure] for run in runs]
            if any(v is None for v in values):  # no validation split: no val column
                cells.append(f"{'-':>17}")
            else:
                cells.append(f"{_cell(values, 1 if measure in ('best_epoch', 'seconds') else 2):>15} "
                             + ("s" if measure == "seconds" else " "))
        lines.append(f"{setting:<{width}}{len(runs):>5}" + "".join(cells))
    return "\n".join(lines).rstrip()


def differences_table(swept: Sweep, metric: str = "best_test_acc", alpha: float = 0.05) -> str:
    """Each pair of settings: the difference of their means, Welch's test, and the verdict."""
    groups = swept.groups()
    if len(groups) < 2:
        return "one setting only: nothing to compare (the grid varies only the seed)"
    if sum(len(runs) > 1 for runs in groups.values()) < 2:
        return ("fewer than two settings have two or more finished seeds: the spread between seeds is unknown, "
                "so no difference can be told from seed noise; add seeds to the grid")
    found = differences(swept, metric, alpha)
    width = max(len(s) for s in groups) + 2
    lines = [f"{metric}: mean of the first setting minus the second's, in points; Welch's t-test, Holm's "
             f"correction over {len(found)} pair(s), alpha {alpha:g}",
             f"{'first':<{width}}{'second':<{width}}{'difference':>11}{'± SE':>7}{'t':>7}{'df':>6}{'p':>7}"
             f"{'Holm p':>8}  verdict"]
    for d in found:
        w = d.test
        verdict = "beyond seed noise" if d.beyond_noise else "within seed noise"
        lines.append(f"{d.first:<{width}}{d.second:<{width}}{w.difference:>+11.2f}{w.standard_error:>7.2f}"
                     f"{w.t:>7.2f}{w.df:>6.1f}{w.p:>7.3f}{d.p_holm:>8.3f}  {verdict}")
    single = [s for s, runs in groups.items() if len(runs) < 2]
    if single:
        lines.append(f"left out, with one finished seed: {', '.join(single)}")
    return "\n".join(lines)


def per_class_table(swept: Sweep) -> str:
    """Best.pt's test accuracy per class: mean ± standard deviation over seeds, a column per setting."""
    groups = swept.groups()
    width = max(15, *(len(s) + 2 for s in groups))
    lines = [f"{'class':<11}" + "".join(f"{s:>{width}}" for s in groups)]
    for c, name in enumerate(CLASSES):
        lines.append(f"{name:<11}" + "".join(f"{_cell([run.per_class[c] for run in runs]):>{width}}"
                                             for runs in groups.values()))
    return "\n".join(lines)


def _legend(setting: str, runs: list[SweptRun]) -> str:
    return f"{setting} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"


def plot_runs(swept: Sweep) -> Figure:
    """Every run's curves overlaid: a colour per setting, a line per seed."""
    return plot_runs_overlaid({_legend(setting, runs): [run.rows for run in runs]
                               for setting, runs in swept.groups().items()},
                              f"{len(swept.runs)} runs of {swept.folder}: a colour per setting, a line per seed")


def plot_per_class(swept: Sweep) -> Figure:
    """Best.pt's test accuracy per class, the settings side by side: mean over seeds, with their
    standard deviation as an error bar."""
    return plot_class_accuracy({_legend(setting, runs): np.stack([run.per_class for run in runs])
                                for setting, runs in swept.groups().items()},
                               "Test accuracy per class (best.pt), mean over seeds ± standard deviation")
