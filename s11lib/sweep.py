"""Batches of runs: every combination of a grid of settings, seeds included, each one
notebooks/train.ipynb through papermill in its own run folder.

    python -m s11lib.sweep SPEC.yaml              # one run after another
    python -m s11lib.sweep SPEC.yaml --gpus all   # one run per GPU at a time (CUDA_VISIBLE_DEVICES)

SPEC.yaml names the sweep's folder, the parameters every run shares, and the grid:

    out_dir: runs/warmup      # the sweep's folder (relative to where the command runs)
    parameters:               # any parameter of s11lib/config.py, the same for every run
      epochs: 40
    grid:                     # lists of values: every combination is one run
      warmup_epochs: [0, 2]
      seed: [1, 2, 3]

Each run goes to OUT_DIR/NAME, NAME being its grid values (`warmup_epochs=0,seed=1`, as Hydra
names the folders of its sweeps), with its executed notebook beside its files and its output in
OUT_DIR/logs/NAME.log. OUT_DIR/summary.csv has one row per run (its status and METRIC_COLUMNS), rewritten
atomically after each run, and OUT_DIR/sweep.json the spec; notebooks/compare.ipynb reads both.

* **Checked first.** An unknown parameter, an empty grid or a value a run would refuse is a
  one-line error before anything runs or is written.
* **Resumable.** A run that ended well leaves FINISHED in its folder, and the same spec run again
  skips it; any other run is started again with the same out_dir, so an interrupted run continues
  from its last.pt (the run's own resume: s11lib/checkpoint.py).
* **Failures stay local.** A run that fails is reported with its one-line error and the others
  go on; the exit status is then 1 (0: every run done, 2: a bad spec, 130: interrupted).
* **Ctrl-C and SIGTERM** stop the runs in progress (each shuts its kernel down) and keep what
  they have for the next call.

Each run is `python -m s11lib.notebook` (what scripts/train.sh runs) in a child process: its
parameters were checked already, but it keeps its own handling of signals and errors, and a run
that dies takes nothing else with it.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from papermill.iorw import NoDatesSafeLoader

from s11lib import provenance
from s11lib.config import Config, check_names
from s11lib.run import OUTPUT_FILES, OneLineParser, check_writable, kept_model_prefix, read_metrics
from s11lib.utils import atomic

SPEC_KEYS = ("out_dir", "parameters", "grid")
FINISHED = "finished.json"  # in a run's folder once its notebook ran to the end, with its parameters
SUMMARY = "summary.csv"
SPEC_COPY = "sweep.json"
LOGS = "logs"
# A run's status in summary.csv: done (finished, in this call or before); failed (its notebook
# failed in this call); interrupted (stopped by Ctrl-C or SIGTERM in this call); pending (not run in
# this call: epochs_done says how far an earlier call took it).
# Accuracies in percent; with ema_decay > 0 they are the weight average's, which best.pt holds.
# final_*: the last epoch's; best_*: best.pt's (its epoch, chosen on validation, and its test
# accuracy as the run reports it at the end), for finished runs only; seconds: the epochs' wall
# time, summed over every call that trained the run.
METRIC_COLUMNS = ("epochs_done", "final_val_acc", "final_test_acc", "best_epoch", "best_val_acc", "best_test_acc",
                  "seconds")
# What made the run (its run.json, s11lib/provenance.py): the commit of every segment (short, "-dirty"
# where the tree had changes, joined by "+" when they differ) and the device's name. Text columns.
PROVENANCE_COLUMNS = ("commit", "device")
_TEXT_COLUMNS = frozenset({"run", "status", "error"})
# Settings that change neither what a run trains nor what it writes: a finished run stays finished
# when only these differ (a sweep moved to another folder, or continued on another machine).
_INCIDENTAL = frozenset({"data_dir", "download", "device", "out_dir", "progress", "resume", "compile",
                         "channels_last"})
POLL_SECONDS = 0.1  # how often a running sweep looks at its runs
STOP_SECONDS = 60.0  # how long a run may take to shut its kernel down after SIGTERM before SIGKILL


@dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    index: int  # 1-based, in grid order
    name: str  # its folder's name, from its grid values
    settings: dict  # its grid values
    parameters: dict  # what the notebook gets: the spec's parameters, the grid values and out_dir
    config: Config  # the run's settings, as the parameters make them

    @property
    def out_dir(self) -> Path:
        return Path(self.parameters["out_dir"])


@dataclass(frozen=True)
class Spec:
    out_dir: Path
    parameters: dict
    grid: dict
    points: tuple[Point, ...]


def _value_text(value) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)  # a value such as "cuda:1" or a path, safe in a folder name


def point_name(settings: dict) -> str:
    """The run folder's name: `lr=0.4,seed=1` for settings {"lr": 0.4, "seed": 1}."""
    return ",".join(f"{key}={_value_text(value)}" for key, value in settings.items())


def read_spec(path: str | os.PathLike) -> Spec:
    """Read and check a sweep spec; every problem is a one-line ValueError, raised before anything runs."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read the sweep spec {path} ({e.strerror or e})") from None
    try:
        spec = yaml.load(text, Loader=NoDatesSafeLoader)  # as papermill reads parameters
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} must be a mapping with the keys {', '.join(SPEC_KEYS)}")
    unknown = [key for key in spec if key not in SPEC_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SPEC_KEYS, n=1, cutoff=0.6)
        raise ValueError(f"{path}: unknown key {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; a sweep spec has the keys {', '.join(SPEC_KEYS)}")
    if not isinstance(spec.get("out_dir"), str) or not spec["out_dir"]:
        raise ValueError(f"{path}: out_dir must name the sweep's folder, e.g. out_dir: runs/sweep")
    parameters = spec.get("parameters") or {}
    grid = spec.get("grid")
    if not isinstance(parameters, dict):
        raise ValueError(f"{path}: parameters must be a mapping of parameter names to values")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: the grid is empty; give it at least one parameter with a list of values, "
                         "e.g. grid: {seed: [1, 2, 3]}")
    for section, names in (("parameters", parameters), ("grid", grid)):
        if "out_dir" in names:
            raise ValueError(f"{path}: out_dir in {section}: each run's out_dir is the sweep's out_dir/NAME")
        try:
            check_names(names)
        except ValueError as e:
            raise ValueError(f"{path}, {section}: {e}") from None
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{name} must be a non-empty list of values, e.g. {name}: [..., ...]; "
                             f"got {values!r}")
        if name in parameters:
            raise ValueError(f"{path}: {name} is both in parameters and in the grid; keep one")
    out_dir = Path(spec["out_dir"])
    points = []
    for index, values in enumerate(itertools.product(*grid.values()), 1):
        settings = dict(zip(grid, values))
        name = point_name(settings)
        parameters_ = {**parameters, **settings, "out_dir": str(out_dir / name)}
        points.append(Point(index, name, settings, parameters_, _config_of(name, parameters_)))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path}: two runs of the grid would share the folder {twice!r}; "
                         "a list of the grid repeats a value")
    return Spec(out_dir, parameters, grid, tuple(points))


def _config_of(name: str, parameters: dict) -> Config:
    try:
        return Config.from_dict(parameters)
    except ValueError as e:
        message = str(e)
        # YAML 1.1 (PyYAML) reads 1e-3 as text, not a number: say so instead of "got '1e-3' (str)".
        for key, value in parameters.items():
            if message.startswith(f"{key} must be") and isinstance(value, str) and _is_number(value):
                message += f"; YAML reads {value} as text: write {float(value)!r}"
        raise ValueError(f"run {name}: {message}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- a run's state, read from its folder -------------------------------------------------------
def _comparable(config: Config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _INCIDENTAL}


def _has_every_file(point: Point) -> bool:
    return all((point.out_dir / name).is_file() for name in OUTPUT_FILES)


def is_finished(point: Point) -> bool:
    """Whether the run ended well with these settings: its FINISHED record says so for the same
    parameters (up to _INCIDENTAL ones), and its files are all there."""
    try:
        record = json.loads((point.out_dir / FINISHED).read_text())
        same = _comparable(Config.from_dict(record["parameters"])) == _comparable(point.config)
        rows = read_metrics(point.out_dir / "metrics.csv")
    except (OSError, ValueError, KeyError, TypeError):  # no record, a torn or foreign one
        return False
    return same and len(rows) == point.config.epochs and _has_every_file(point)


def summary_row(point: Point, status: str, error: str = "") -> dict:
    """The run's row of summary.csv, from the files in its folder."""
    row = {"run": point.name, "status": status, **point.settings, **dict.fromkeys(METRIC_COLUMNS),
           **_made_by(point.out_dir), "error": error}
    try:
        rows = read_metrics(point.out_dir / "metrics.csv")
    except (OSError, ValueError, KeyError):
        rows = []
    if not rows:
        row["epochs_done"] = 0
        return row
    average = kept_model_prefix(point.config)
    row.update(epochs_done=len(rows), final_val_acc=rows[-1][f"{average}val_acc"],
               final_test_acc=rows[-1][f"{average}test_acc"], seconds=round(sum(r["seconds"] for r in rows), 1))
    if status == "done":
        explained = json.loads((point.out_dir / "misclassified.json").read_text())
        best = explained["epoch"]
        row.update(best_epoch=best, best_val_acc=rows[best - 1][f"{average}val_acc"],
                   best_test_acc=explained["test_accuracy"])
    return row


def _made_by(run_dir: Path) -> dict:
    """summary.csv's provenance cells of a run folder: empty without a run.json."""
    state = provenance.read(run_dir)
    if state is None:
        return dict.fromkeys(PROVENANCE_COLUMNS)
    commits = list(dict.fromkeys(provenance.short(s) for s in state["segments"]))
    return {"commit": "+".join(commits) or None, "device": state["device"]["name"]}


def write_summary(spec: Spec, rows: list[dict]) -> Path:
    path = spec.out_dir / SUMMARY
    columns = ["run", "status", *spec.grid, *METRIC_COLUMNS, *PROVENANCE_COLUMNS, "error"]
    with atomic.atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return path


def read_summary(path: str | os.PathLike) -> list[dict]:
    """summary.csv back as dicts: numbers as numbers, empty cells as None, the rest as text."""
    def value(text: str):
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return {"True": True, "False": False, "None": None}.get(text, text)

    with open(path, newline="") as f:
        return [{k: v if k in _TEXT_COLUMNS else (v or None) if k in PROVENANCE_COLUMNS else value(v)
                 for k, v in row.items()}
                for row in csv.DictReader(f)]


# --- running -------------------------------------------------------------------------------------
@dataclass
class _Running:
    point: Point
    process: subprocess.Popen
    log: Path
    log_start: int  # where this call's output begins in the log
    started: float


def parse_gpus(text: str) -> list[str]:
    """--gpus: `all`, or indices as torch numbers the GPUs (`0,1`); the CUDA_VISIBLE_DEVICES value of
    each (the entries of this process's own CUDA_VISIBLE_DEVICES, when it has one)."""
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("--gpus: this machine has no CUDA GPU; without --gpus the runs go one after another")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")][:count] if visible else [str(i) for i in range(count)]
    if text == "all":
        return ids
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--gpus takes `all` or GPU numbers such as 0,1; got {text!r}") from None
    wrong = [i for i in indices if not 0 <= i < count]
    if wrong or len(set(indices)) != len(indices):
        raise ValueError(f"--gpus {text}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}, "
                         "each named once")
    return [ids[i] for i in indices]


def _last_error(log: Path, start: int) -> str:
    """The run's one-line error from its log: the last `error: ` line of this call's output."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else "")


class Runner:
    """Runs a spec's points: `Runner(spec, gpus).run()` returns the exit status."""

    def __init__(self, spec: Spec, gpus: list[str] | None = None, say=print):
        self.spec = spec
        self.slots = list(gpus) if gpus else [None]  # None: this process's own devices
        self.say = say
        self.status: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def _line(self, point: Point, text: str) -> None:
        self.say(f"[{point.index}/{len(self.spec.points)}] {point.name}: {text}")

    def _summary(self) -> dict[str, dict]:
        """Write summary.csv from each run's folder; its rows, by run."""
        rows = {p.name: summary_row(p, self.status[p.name], self.errors.get(p.name, "")) for p in self.spec.points}
        write_summary(self.spec, list(rows.values()))
        return rows

    def _start(self, point: Point, gpu: str | None) -> _Running:
        if point.out_dir.is_dir():  # a record of other settings: this run replaces it
            (point.out_dir / FINISHED).unlink(missing_ok=True)
        log = self.spec.out_dir / LOGS / f"{point.name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows the run as it goes
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(log, "ab") as f:
            start = f.tell()
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {point.name} started"
                    f"{f' on CUDA_VISIBLE_DEVICES={gpu}' if gpu is not None else ''}\n".encode())
            f.flush()
            command = [sys.executable, "-m", "s11lib.notebook", "-y", yaml.safe_dump(point.parameters)]
            # Its own session: a Ctrl-C at the terminal reaches this process alone, which stops each
            # run with exactly one SIGTERM (a second signal could cut its kernel's shutdown short).
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True)
        where = f" on GPU {gpu}" if gpu is not None else ""
        self._line(point, f"started{where}; log: {log}")
        return _Running(point, process, log, start, time.monotonic())

    def _finish(self, running: _Running, code: int) -> None:
        point, seconds = running.point, time.monotonic() - running.started
        if code == 0 and _has_every_file(point):
            atomic.save_json({"parameters": point.parameters, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "seconds": round(seconds, 1)}, point.out_dir / FINISHED)
            self.status[point.name] = "done"
        else:
            self.status[point.name] = "failed"
            self.errors[point.name] = ("its notebook ended, but the run's files are not all there" if code == 0 else
                                       _last_error(running.log, running.log_start) or f"exit status {code}")
        with open(running.log, "ab") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} exit status {code}\n".encode())
        row = self._summary()[point.name]
        if row["status"] == "done":
            self._line(point, f"done in {seconds:.1f} s; best.pt (epoch {row['best_epoch']}): "
                              f"test {row['best_test_acc']:.2f}%")
        else:
            self._line(point, f"FAILED (exit {code}) after {seconds:.1f} s: {row['error']}; log: {running.log}")

    def run(self) -> int:
        spec = self.spec
        for point in spec.points:
            self.status[point.name] = "done" if is_finished(point) else "pending"
            if self.status[point.name] == "done":
                self._line(point, "finished before; skipped")
        todo = [p for p in spec.points if self.status[p.name] == "pending"]
        self._summary()
        summary = spec.out_dir / SUMMARY
        running: dict[int, _Running] = {}  # slot -> its run
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while todo or running:
                for slot, gpu in enumerate(self.slots):
                    if slot not in running and todo:
                        running[slot] = self._start(todo.pop(0), gpu)
                time.sleep(POLL_SECONDS)
                for slot, run in list(running.items()):
                    code = run.process.poll()
                    if code is not None:
                        del running[slot]
                        self._finish(run, code)
        except KeyboardInterrupt:
            self._stop(list(running.values()))
            self.say(f"interrupted; the same command continues the sweep (finished runs are skipped, "
                     f"stopped ones continue from their last.pt); summary: {summary}")
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        failed = [p.name for p in spec.points if self.status[p.name] == "failed"]
        done = sum(self.status[p.name] == "done" for p in spec.points)
        self.say(f"sweep: {done} of {len(spec.points)} runs done"
                 + (f", {len(failed)} failed ({', '.join(failed)})" if failed else "") + f"; summary: {summary}")
        return 1 if failed else 0

    def _stop(self, runs: list[_Running]) -> None:
        """SIGTERM to each run (it shuts its kernel down and keeps last.pt), then wait for them."""
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the waiting short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for run in runs:
                run.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_SECONDS
            for run in runs:
                try:
                    run.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(run.process.pid, signal.SIGKILL)
                    run.process.wait()
                self.status[run.point.name] = "interrupted"
                with open(run.log, "ab") as f:
                    f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} interrupted (exit status "
                            f"{run.process.returncode})\n".encode())
                self._line(run.point, f"interrupted after {time.monotonic() - run.started:.1f} s; it continues "
                                      "from its last.pt next time")
            self._summary()
        finally:
            signal.signal(signal.SIGINT, interrupt)


def _raise_interrupt(signum, frame):  # `kill`, `timeout`, a job scheduler: stop as Ctrl-C does
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m s11lib.sweep", allow_abbrev=False,
                           description=__doc__.split("\n\n")[0].replace("\n", " "),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="SPEC.yaml, for example:\n\n"
                                  + re.search(r"\n\n( +out_dir:.*?)\n\n", __doc__, re.S)[1])
    parser.add_argument("spec", metavar="SPEC.yaml", help="the sweep: out_dir, parameters and grid")
    parser.add_argument("--gpus", metavar="all|0,1,...",
                        help="run one run per GPU at a time, on these GPUs (default: one run at a time, "
                             "on this process's devices)")
    args = parser.parse_args(argv)
    try:
        spec = read_spec(args.spec)
        gpus = parse_gpus(args.gpus) if args.gpus else None
        check_writable(spec.out_dir)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(atomic.exclusive(spec.out_dir))
            except ValueError:
                raise ValueError(f"another sweep is running in {spec.out_dir}; wait for it or use another "
                                 "out_dir") from None
            (spec.out_dir / LOGS).mkdir(exist_ok=True)
            atomic.save_json({"spec": str(args.spec), "parameters": spec.parameters, "grid": spec.grid,
                              "runs": [p.name for p in spec.points]}, spec.out_dir / SPEC_COPY)
            return Runner(spec, gpus, say=lambda line: print(line, flush=True)).run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the sweep's folder cannot be made or written
        print(f"error: {e.filename}: {e.strerror or e}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
