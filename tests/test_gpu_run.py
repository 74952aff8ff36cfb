"""scripts/gpu_run.sh, the lent GPU machine's script, run here on the CPU with a tiny model: what
it sends back when a run is cut off at its limit, and that a failed smoke run stops it.

No outcome here depends on how fast the CPU is. The cut-off test does not race a wall clock: with
a generous limit it waits for the run's first epoch on disk, then fires the limit itself (SIGALRM
to the script's `timeout`, which then acts exactly as when its time runs out); with a limit so low
that the run is cut before any epoch, it checks what the script sends back then.
"""
from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each call trains a smoke run and a real one in child processes
SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_run.sh"
TINY = ["--device", "cpu", "--width", "8", "--train-subset", "512", "--val-size", "64", "--test-subset", "128",
        "--batch-size", "128"]
GUARD_S = 300  # a guard against a hang, far above what any step here takes: it never decides an outcome


def _env(tmp_path, run_s) -> dict:
    return dict(os.environ, PYTHON=sys.executable, RUNS_DIR=str(tmp_path / "runs"), SMOKE_S=str(GUARD_S),
                RUN_S=str(run_s))


def _command(data_dir, tmp_path, *options) -> list[str]:
    return ["bash", str(SCRIPT), str(data_dir), str(tmp_path / "out"), "1", "--", *options]


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _epochs(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0


def _children(pid: int, name: str) -> list[int]:
    """The processes called `name` whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if comm == name and int(rest[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("run_s", [1, 3600], ids=["cut-before-its-first-epoch", "cut-after-its-first-epoch"])
def test_a_run_cut_off_at_its_limit_still_sends_back_its_finished_epochs(data_dir, tmp_path, run_s):
    metrics = tmp_path / "runs" / "cpu-seed1" / "metrics.csv"
    script = subprocess.Popen(_command(data_dir, tmp_path, *TINY, "--epochs", "1000"), env=_env(tmp_path, run_s),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + GUARD_S
        while script.poll() is None and _epochs(metrics) < 1:
            assert time.monotonic() < deadline, "neither an epoch nor the cut came"
            time.sleep(0.05)
        cut_by_test = script.poll() is None
        if cut_by_test:  # its first epoch is on disk: the limit "runs out" now
            timers = _children(script.pid, "timeout")
            assert len(timers) == 1, timers
            os.kill(timers[0], signal.SIGALRM)
        output, _ = script.communicate(timeout=GUARD_S)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 124, output
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == f"no CUDA GPU; torch {__import__('torch').__version__}"
    assert summary[2] == "smoke-seed1: exit 0, " + summary[2].split(", ")[1]
    assert summary[4].startswith(f"cpu-seed1: cut off at its limit of {run_s} s (it resumes from last.pt)")
    smoke = _members(out / "smoke-seed1.tar")
    assert {"metrics.csv", "misclassified.json", "gradcam.npz", "test_predictions.npy", "gradcam.png"} <= set(smoke)
    assert not any(name.endswith(".pt") for name in smoke)
    assert len(list(csv.DictReader(io.StringIO(smoke["metrics.csv"].decode())))) == 2
    finished = _epochs(metrics)  # what the run left on the machine
    if run_s == 3600:
        assert cut_by_test and finished >= 1  # the limit was never reached by the clock
    if finished:
        cut = _members(out / "cpu-seed1.tar")
        epochs = list(csv.DictReader(io.StringIO(cut["metrics.csv"].decode())))
        assert len(epochs) == finished < 1000 and not any(name.endswith(".pt") for name in cut)
        assert (tmp_path / "runs" / "cpu-seed1" / "last.pt").is_file()  # kept on the machine, to resume from
    else:  # cut while it started: nothing trained, so no epoch is sent back, only the log
        assert (out / "cpu-seed1.log").is_file()
        assert not (out / "cpu-seed1.tar").exists() or "metrics.csv" not in _members(out / "cpu-seed1.tar")


def test_a_failed_smoke_run_stops_it_before_the_real_run(data_dir, tmp_path):
    done = subprocess.run(_command(data_dir, tmp_path, *TINY, "--widht", "8"), env=_env(tmp_path, GUARD_S),
                          capture_output=True, text=True, timeout=GUARD_S)
    assert done.returncode == 2, done.stdout + done.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "smoke-seed1: exit 2" in summary and "cpu-seed1" not in summary
    assert "did you mean --width?" in (tmp_path / "out" / "smoke-seed1.log").read_text()
