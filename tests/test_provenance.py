"""run.json: what made a run (s11lib/provenance.py). Segments of a killed and resumed run, a dirty
checkout, no checkout, no git, a torch that changed between segments, a kill while run.json is
written, and what explore and the sweep's summary read from it."""
import json
import os
import shutil
import subprocess

import pytest
import torch

import s11lib
from s11lib import provenance
from s11lib.explore import load_run, summary
from s11lib.run import read_metrics, run
from test_resume import _config, _run_child

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not on the PATH")


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout of one commit, standing in for s11lib's own, and its commit."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    (folder / "code.py").write_text("x = 1\n")
    _git(folder, "init", "-q")
    _git(folder, "add", "code.py")
    _git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", folder)
    return folder, commit


def test_a_killed_and_resumed_run_has_two_segments_whose_epochs_add_up(data_dir, tmp_path):
    _run_child(data_dir, tmp_path, "--kill-after-step", "6", killed=True)  # 4 steps an epoch: in epoch 2
    first = json.loads((tmp_path / "run.json").read_text())
    assert [(s["first_epoch"], s["last_epoch"], s["end"]) for s in first["segments"]] == [(1, 1, None)]  # killed
    _run_child(data_dir, tmp_path)
    state = json.loads((tmp_path / "run.json").read_text())
    one, two = state["segments"]
    assert one == first["segments"][0]
    assert (two["first_epoch"], two["last_epoch"]) == (2, 3) and two["end"] >= two["start"] >= one["start"]
    epochs = sum(s["last_epoch"] - s["first_epoch"] + 1 for s in state["segments"])
    assert epochs == len(read_metrics(tmp_path / "metrics.csv")) == 3
    assert state["s11lib"] == s11lib.__version__ and state["versions"]["torch"] == torch.__version__
    assert state["device"] | {"name": None} == {
        "type": "cpu", "name": None, "capability": None, "count": os.cpu_count(), "precision": "fp32",
        "precision_why": state["device"]["precision_why"], "compile": False, "channels_last": False, "world_size": 1}
    assert state["device"]["precision_why"].startswith("fp32 (")
    assert two["host"] and two["torch"] == torch.__version__ and state["notes"] == []


@needs_git
def test_a_run_in_a_dirty_checkout_says_dirty(data_dir, tmp_path, checkout):
    folder, commit = checkout
    assert provenance.git_state() == {"commit": commit, "dirty": False}
    (folder / "untracked.py").write_text("")  # untracked files do not make it dirty: they are not the code
    assert provenance.git_state() == {"commit": commit, "dirty": False}
    (folder / "code.py").write_text("x = 2\n")
    run(_config(data_dir, tmp_path / "run", epochs=1))
    state = provenance.read(tmp_path / "run")
    assert state["git"] == {"commit": commit, "dirty": True}
    assert state["segments"][0]["commit"] == commit and state["segments"][0]["dirty"] is True
    assert f"commit {commit[:7]}-dirty" in provenance.describe(state)


def test_outside_a_git_checkout_or_without_git_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", tmp_path)  # a folder in no checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not look above it
    assert provenance.git_state() == {"commit": None, "note": "not a git checkout"}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all: the same, and no error
    assert provenance.git_state() == {"commit": None, "note": "not a git checkout"}
    assert provenance.short({"commit": None}) == "not a git checkout"


def test_a_segment_with_another_torch_says_so_in_one_line_and_in_run_json(data_dir, tmp_path, monkeypatch, capsys):
    run(_config(data_dir, tmp_path, epochs=1))
    began = provenance.read(tmp_path)["segments"][0]
    capsys.readouterr()
    real = provenance.versions
    monkeypatch.setattr(provenance, "versions", lambda: {**real(), "torch": "9.9.9"})
    run(_config(data_dir, tmp_path, epochs=2))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: segment")]
    expected = (f"segment 2 runs commit {provenance.short(began)} with torch 9.9.9; "
                f"the run began with commit {provenance.short(began)} "
                f"and torch {torch.__version__}")
    assert notes == [f"note: {expected}"]
    state = provenance.read(tmp_path)
    assert state["notes"] == [expected] and [s["torch"] for s in state["segments"]] == [torch.__version__, "9.9.9"]
    assert state["versions"]["torch"] == "9.9.9"  # the top level is the latest segment's
    described = provenance.describe(state)
    assert "in 2 segments:" in described and f"note: {expected}" in described


def test_run_json_survives_a_kill_during_its_write(data_dir, tmp_path):
    # Its 1st write is at the claim, its 2nd after epoch 1's checkpoint: die 40 bytes into that one.
    _run_child(data_dir, tmp_path, "--kill-writing", "run.json:2:40", killed=True)
    assert len(list(tmp_path.glob(".run.json.*.tmp"))) == 1
    state = json.loads((tmp_path / "run.json").read_text())  # the claim's version, whole
    assert [(s["first_epoch"], s["end"]) for s in state["segments"]] == [(None, None)]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # written before it
    _run_child(data_dir, tmp_path)
    state = json.loads((tmp_path / "run.json").read_text())
    assert [(s["first_epoch"], s["last_epoch"]) for s in state["segments"]] == [(None, None), (2, 3)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_run_without_run_json_is_described_as_unrecorded_and_resumes_with_a_note(data_dir, tmp_path, capsys):
    run(_config(data_dir, tmp_path, epochs=1))
    (tmp_path / "run.json").unlink()  # a run begun before s11lib wrote one
    result = run(_config(data_dir, tmp_path, epochs=2))
    state = provenance.read(tmp_path)
    assert [(s["first_epoch"], s["last_epoch"]) for s in state["segments"]] == [(2, 2)]
    assert state["notes"] == ["resumed from a run whose earlier segments were not recorded (no readable run.json)"]
    assert provenance.describe(None).startswith("made by: not recorded")
    finished = load_run(tmp_path, device="cpu")
    assert finished.provenance == state and len(result.rows) == 2
    text = summary(finished)
    assert "made by: s11lib" in text and "in 1 segment:" in text and "1. epochs 2-2" in text
