"""What made a run: `run.json` beside its results, with the code, the versions, the machine and
every segment of training (each start of `run()` on the folder).

A figure in the README or a sweep's summary is only as good as the trace back to what produced
it. run.json holds:

* `s11lib`: the package version, and `git`: the commit of the checkout s11lib was imported from
  and whether its tree had uncommitted changes to tracked files (`dirty`), or
  `{"commit": null, "note": "not a git checkout"}` (an installed wheel, git missing);
* `versions`: Python, torch, torchvision, numpy;
* `device`: its name, compute capability and count (a CPU: its model and logical cores, no
  capability), the precision chosen and why,
  compile, channels_last and the world size (data-parallel processes);
* `segments`: one per start of `run()`, with the epochs it trained (`first_epoch`, `last_epoch`,
  null until its first epoch is written), its start and end (UTC, ISO 8601; `end` null while it
  runs, or when it was killed), the host's name, the commit and torch version;
* `notes`: what a reader must know, such as a resumed segment whose commit or torch differs
  from the first segment's (also printed as one line when that segment starts).

It is written atomically when the run claims its folder and again as each epoch's files are
written (by the background writer, never on the per-step path), and once more when the segment
ends. git is read through `git` on the PATH, if there is one; its absence is no error.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import numpy as np
import torch

import s11lib
from s11lib.utils import atomic

RUN_JSON = "run.json"
NOT_A_CHECKOUT = "not a git checkout"
_PACKAGE_DIR = Path(s11lib.__file__).resolve().parent


def now() -> str:
    """The current time, UTC, to the second (ISO 8601)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def git_state(folder: Path | None = None) -> dict:
    """{"commit": the HEAD commit, "dirty": tracked files changed} of the checkout holding `folder`
    (default: s11lib's own code), or {"commit": None, "note": why not} when it is none (or git
    cannot be run)."""
    folder = _PACKAGE_DIR if folder is None else folder
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git on the PATH, not a checkout, a git that hangs
        return {"commit": None, "note": NOT_A_CHECKOUT}
    return {"commit": commit, "dirty": dirty}


def versions() -> dict:
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__}


def device_info(device: torch.device, precision, compile: bool, channels_last: bool, world_size: int) -> dict:
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        name, count, capability = torch.cuda.get_device_name(device), torch.cuda.device_count(), list(capability)
    else:  # the processor's model, and its logical cores
        name, count, capability = cpu_name(), os.cpu_count(), None
    return {"type": device.type, "name": name, "capability": capability, "count": count,
            "precision": precision.name, "precision_why": str(precision), "compile": compile,
            "channels_last": channels_last, "world_size": world_size}


def cpu_name() -> str:
    """The processor's model name ("Intel(R) Xeon(R) Processor"), from /proc/cpuinfo on Linux, else
    what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def short(made: dict) -> str:
    """The commit of `made` (run.json's `git`, or one of its segments) in 7 characters, "-dirty"
    when its tree had changes; "not a git checkout" when it has none."""
    commit = made.get("commit")
    return NOT_A_CHECKOUT if commit is None else commit[:7] + ("-dirty" if made.get("dirty") else "")


class Record:
    """run.json of one run folder, kept in memory and rewritten atomically on every change."""

    def __init__(self, out_dir: Path, state: dict):
        self.path = Path(out_dir) / RUN_JSON
        self.state = state

    @classmethod
    def begin(cls, out_dir: Path, device: torch.device, precision, compile: bool, channels_last: bool,
              world_size: int, resumed: bool, say=print) -> "Record":
        """Start a segment: a fresh run.json, or the folder's with one more segment when `resumed`
        (a missing or unreadable run.json, from a run begun before s11lib wrote one, starts the
        list afresh with a note). Writes it, and prints one line when the code or torch changed."""
        git, found = git_state(), versions()
        segment = {"first_epoch": None, "last_epoch": None, "start": now(), "end": None,
                   "host": socket.gethostname(), "commit": git["commit"], "dirty": git.get("dirty"),
                   "torch": found["torch"]}
        current = {"s11lib": s11lib.__version__, "git": git, "versions": found,
                   "device": device_info(device, precision, compile, channels_last, world_size)}
        old = _read(Path(out_dir) / RUN_JSON) if resumed else None
        notes: list[str] = []
        segments = []
        if resumed and old is None:
            notes.append("resumed from a run whose earlier segments were not recorded (no readable run.json)")
        if old is not None:
            segments, notes = list(old.get("segments", [])), list(old.get("notes", []))
            first = segments[0] if segments else None
            if first and (first.get("commit"), first.get("torch")) != (segment["commit"], segment["torch"]):
                note = (f"segment {len(segments) + 1} runs commit {short(segment)} "
                        f"with torch {segment['torch']}; the run began with commit "
                        f"{short(first)} and torch {first.get('torch')}")
                notes.append(note)
                say(f"note: {note}")
        record = cls(out_dir, {**current, "segments": [*segments, segment], "notes": notes})
        record.save()
        return record

    @property
    def segment(self) -> dict:
        return self.state["segments"][-1]

    def epoch_done(self, epoch: int) -> dict:
        """The state with this segment's last epoch set (and its first, at its first epoch): a copy,
        for the background writer to save beside the epoch's checkpoint."""
        segment = self.segment
        if segment["first_epoch"] is None:
            segment["first_epoch"] = epoch
        segment["last_epoch"] = epoch
        return json.loads(json.dumps(self.state))

    def end(self) -> None:
        self.segment["end"] = now()
        self.save()

    def save(self) -> None:
        atomic.save_json(self.state, self.path)


def _read(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("segments"), list) else None


def read(run_dir: str | Path) -> dict | None:
    """A run folder's run.json, or None when it has none (a run from before s11lib wrote one)."""
    return _read(Path(run_dir) / RUN_JSON)


def describe(state: dict | None) -> str:
    """What made a run, in a few lines (explore.ipynb's header)."""
    if state is None:
        return "made by: not recorded (no run.json: the run began before s11lib wrote one)"
    git, device, found = state["git"], state["device"], state["versions"]
    segments = state["segments"]
    code = f"s11lib {state['s11lib']}, commit {short(git)}"
    lines = [f"made by: {code}; torch {found['torch']}, torchvision {found['torchvision']}, "
             f"Python {found['python']}",
             f"on: {device['name']}" + (f" (compute capability {'.'.join(map(str, device['capability']))}, "
                                         f"{device['count']} visible)" if device.get("capability")
                                         else f" ({device['count']} cores)" if device.get("count") else "")
             + f"; {device['precision_why']}; compile {device['compile']}, channels_last {device['channels_last']}"
             + (f", {device['world_size']} processes" if device.get("world_size", 1) > 1 else ""),
             f"in {len(segments)} segment{'s' if len(segments) != 1 else ''}:"]
    for i, s in enumerate(segments, 1):
        epochs = (f"epochs {s['first_epoch']}-{s['last_epoch']}" if s.get("first_epoch") is not None
                  else "no epoch completed")
        end = s.get("end") or "not recorded (stopped or killed)"
        lines.append(f"  {i}. {epochs}, {s['start']} to {end}, on {s['host']}, commit "
                     f"{short(s)}, torch {s['torch']}")
    lines += [f"note: {note}" for note in state.get("notes", [])]
    return "\n".join(lines)
