"""scripts/gpu_run.sh, the lent GPU machine's script, run here on the CPU with a tiny model: what
it sends back when a run is cut off at its limit, and that a failed smoke run stops it."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_run.sh"
TINY = ["--device", "cpu", "--width", "8", "--train-subset", "512", "--val-size", "64", "--test-subset", "128",
        "--batch-size", "128"]


def _gpu_run(data_dir, tmp_path, *options, run_s=8):
    env = dict(os.environ, PYTHON=sys.executable, RUNS_DIR=str(tmp_path / "runs"), SMOKE_S="120", RUN_S=str(run_s))
    return subprocess.run(["bash", str(SCRIPT), str(data_dir), str(tmp_path / "out"), "1", "--", *options],
                          env=env, capture_output=True, text=True, timeout=300)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_a_run_cut_off_at_its_limit_still_sends_back_its_finished_epochs(data_dir, tmp_path):
    done = _gpu_run(data_dir, tmp_path, *TINY, "--epochs", "1000")
    assert done.returncode == 124, done.stdout + done.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["cpu-seed1.log", "cpu-seed1.tar", "smoke-seed1.log",
                                                     "smoke-seed1.tar", "summary.txt"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == f"no CUDA GPU; torch {__import__('torch').__version__}"
    assert summary[2] == "smoke-seed1: exit 0, " + summary[2].split(", ")[1]
    assert summary[4].startswith("cpu-seed1: cut off at its limit of 8 s (it resumes from last.pt)")
    smoke = _members(out / "smoke-seed1.tar")
    assert {"metrics.csv", "misclassified.json", "gradcam.npz", "test_predictions.npy", "gradcam.png"} <= set(smoke)
    assert not any(name.endswith(".pt") for name in smoke)
    assert len(list(csv.DictReader(io.StringIO(smoke["metrics.csv"].decode())))) == 2
    cut = _members(out / "cpu-seed1.tar")
    epochs = list(csv.DictReader(io.StringIO(cut["metrics.csv"].decode())))
    assert 1 <= len(epochs) < 1000 and not any(name.endswith(".pt") for name in cut)
    assert (tmp_path / "runs" / "cpu-seed1" / "last.pt").is_file()  # kept on the machine, to resume from


def test_a_failed_smoke_run_stops_it_before_the_real_run(data_dir, tmp_path):
    done = _gpu_run(data_dir, tmp_path, *TINY, "--widht", "8")
    assert done.returncode == 2, done.stdout + done.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "smoke-seed1: exit 2" in summary and "cpu-seed1" not in summary
    assert "did you mean --width?" in (tmp_path / "out" / "smoke-seed1.log").read_text()
