"""Crashes: a run SIGKILLed mid-epoch or mid-write, run again, ends bit for bit where an
uninterrupted run ends; every file is replaced atomically; a diverged run keeps its last good
checkpoint; resume=False and a fresh out_dir start over without touching another run's files.

The crashing runs are child processes (tests/crash.py) that SIGKILL themselves at an exact point.
"""
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import s11lib.run as run_module
from s11lib import checkpoint
from s11lib.checkpoint import CheckpointError
from s11lib.config import Config
from s11lib.models import resnet18
from s11lib.run import OUTPUT_FILES, read_metrics, run
from s11lib.utils import atomic
from s11lib.utils.train_test import DivergedError, NonFiniteLossError

CRASH = Path(__file__).with_name("crash.py")
# 128 training images in batches of 32: 4 steps per epoch, 3 epochs (~5 s a run on 2 CPU cores). No
# warm-up floor, so that the warm-up ends after epoch 1 and the plateau scheduler acts (and is resumed).
# On the CPU, wherever the tests run: only there is a run bit for bit repeatable.
# The shipped optimiser (Adam) at its shipped rate, with a warm-up so that a resume lands inside one.
SETTINGS = dict(device="cpu", download=False, width=8, epochs=3, batch_size=32, train_subset=160, val_size=32,
                test_subset=64, warmup_epochs=1, warmup_min_steps=0, progress=False, num_misclassified=5)


def _child(*args: str, killed: bool) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(CRASH), *args], capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if killed else 0
    assert proc.returncode == expected, f"exit {proc.returncode}, expected {expected}\n{proc.stderr[-3000:]}"
    return proc


def _run_child(data_dir, out_dir, *kill: str, killed: bool = False, **overrides) -> subprocess.CompletedProcess:
    config = {**SETTINGS, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides}
    return _child("run", json.dumps(config), *kill, killed=killed)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    _run_child(data_dir, out_dir)
    return out_dir


def _identical(a, b, where="") -> None:
    """Tensors equal bit for bit, containers recursively, everything else by ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # wall time varies


def assert_same_run(expected: Path, actual: Path) -> None:
    """Everything a run leaves equals, bit for bit, except wall-clock seconds and out_dir."""
    assert sorted(p.name for p in actual.iterdir()) == sorted(OUTPUT_FILES)  # no temporary files left
    assert _without_seconds(read_metrics(actual / "metrics.csv")) == _without_seconds(read_metrics(expected / "metrics.csv"))
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (expected, actual))
        for state in (a, b):
            state["config"].pop("out_dir")
            state["metrics"].pop("seconds")
            state["history"] = _without_seconds(state.get("history", []))
        _identical(a, b, name)  # weights, optimizer, scheduler, RNG states, best so far
    assert json.loads((actual / "misclassified.json").read_text()) == json.loads((expected / "misclassified.json").read_text())
    with np.load(expected / "gradcam.npz") as a, np.load(actual / "gradcam.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert np.array_equal(np.load(actual / "test_predictions.npy"), np.load(expected / "test_predictions.npy"))


@pytest.mark.slow
def test_killed_three_times_then_finishes_as_if_never_killed(data_dir, uninterrupted, tmp_path):
    # 1. Epoch 1 always improves on nothing; its best.pt write dies, after last.pt is complete.
    _run_child(data_dir, tmp_path, "--kill-writing", "best.pt:1:1024", killed=True)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["best"]["epoch"] == 1
    assert not (tmp_path / "best.pt").exists() and len(list(tmp_path.glob(".best.pt.*.tmp"))) == 1

    # 2. Run again: it rebuilds best.pt from last.pt, clears the leftover, and dies mid-epoch 2.
    again = _run_child(data_dir, tmp_path, "--kill-after-step", "2", killed=True)
    assert f"resuming from {tmp_path / 'last.pt'}: 1 of 3 epochs done" in again.stdout
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1]
    assert not list(tmp_path.glob(".*.tmp"))

    # 3. Again: epoch 2 completes; the write of epoch 3's last.pt dies after 64 KiB of ~800 KB.
    _run_child(data_dir, tmp_path, "--kill-writing", "last.pt:2:65536", killed=True)
    partial = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size == 65536  # it died mid-write...
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2  # ...leaving the old last.pt, whole
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2]  # last.pt goes first

    # 4. Again, undisturbed: the end is the uninterrupted run's, bit for bit.
    again = _run_child(data_dir, tmp_path)
    assert f"resuming from {tmp_path / 'last.pt'}: 2 of 3 epochs done" in again.stdout
    assert_same_run(uninterrupted, tmp_path)


def test_killed_during_a_background_write_while_the_next_epoch_trains(data_dir, uninterrupted, tmp_path):
    # Epoch 2's last.pt dies after 64 KiB, held there until epoch 3 has taken 2 steps (4 an epoch):
    # the write really ran beside the training, and the kill lands in the middle of both.
    died = _run_child(data_dir, tmp_path, "--kill-writing", "last.pt:2:65536", "--steps-meanwhile", "2", killed=True)
    assert "dying at step 10" in died.stderr  # 4 + 4 + 2: epoch 3 was training during the write
    partial = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size == 65536
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # the last whole checkpoint
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1]  # written after last.pt
    again = _run_child(data_dir, tmp_path)
    assert f"resuming from {tmp_path / 'last.pt'}: 1 of 3 epochs done" in again.stdout
    assert_same_run(uninterrupted, tmp_path)


def test_the_writer_runs_one_write_at_a_time_in_order_and_hands_errors_back():
    writer = atomic.BackgroundWriter()
    release, log = threading.Event(), []

    def slow(name):
        release.wait(30)
        log.append(name)

    writer.submit(slow, "epoch 1")
    assert writer.busy and log == []  # submit returned while the write waits: it is off the caller's path
    release.set()
    writer.submit(log.append, "epoch 2")  # waits for epoch 1's first
    assert log[0] == "epoch 1"
    writer.wait()
    assert log == ["epoch 1", "epoch 2"] and not writer.busy

    def fails():
        raise OSError(28, "No space left on device")
    writer.submit(fails)
    with pytest.raises(OSError, match="No space left"):  # raised in the caller's thread, at the next call
        writer.submit(log.append, "epoch 3")
    assert log == ["epoch 1", "epoch 2"]  # a write after a failed one does not start
    writer.submit(fails)
    with pytest.raises(KeyError, match="the run's own error"):  # leaving on an error keeps that error
        with writer:
            raise KeyError("the run's own error")
    assert not writer.busy
    writer.wait()  # the failed write's error was dropped with the run's own, not kept for later


def test_the_state_handed_to_the_writer_is_a_copy_the_next_epoch_cannot_change():
    config = Config(**{**SETTINGS, "data_dir": "unused", "out_dir": "unused"})
    model = resnet18(width=8)
    optimizer = run_module.make_optimizer(model, config, torch.device("cpu"))
    scheduler = run_module.make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = checkpoint.last_state(model, optimizer, scheduler, scaler, None, 1, config, [{"epoch": 1}], 1, 50.0,
                                  "val_acc", torch.device("cpu"))
    before = {k: v.clone() for k, v in state["model"].items()}
    momentum = [s["momentum_buffer"].clone() for s in state["optimizer"]["state"].values()]
    with torch.no_grad():  # what the next epoch does to the live tensors
        for p in model.parameters():
            p.add_(1.0)
        for s in optimizer.state.values():
            s["momentum_buffer"].add_(1.0)
    assert all(torch.equal(state["model"][k], before[k]) for k in before)
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(state["optimizer"]["state"].values(), momentum))
    live = {p.data_ptr() for p in model.parameters()} | {s["momentum_buffer"].data_ptr() for s in optimizer.state.values()}
    assert not live & {t.data_ptr() for t in state["model"].values()}


@pytest.mark.slow
def test_a_run_with_a_weight_average_resumes_bit_for_bit(data_dir, tmp_path_factory):
    whole, broken = tmp_path_factory.mktemp("ema-whole"), tmp_path_factory.mktemp("ema-broken")
    _run_child(data_dir, whole, ema_decay=0.9)
    _run_child(data_dir, broken, "--kill-after-step", "6", killed=True, ema_decay=0.9)  # mid-epoch 2
    again = _run_child(data_dir, broken, ema_decay=0.9)
    assert f"resuming from {broken / 'last.pt'}: 1 of 3 epochs done" in again.stdout
    assert_same_run(whole, broken)  # the average included: last.pt holds it under "ema"
    last = torch.load(broken / "last.pt", weights_only=True)
    assert last["ema"].keys() == last["model"].keys()
    assert not all(torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])


@pytest.fixture(scope="module")
def killed_writers(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("writers")
    ended = json.loads(_child("write", str(folder), "100", killed=False).stdout)
    return folder, ended


@pytest.mark.parametrize("kind", ["torch", "json", "csv", "npz", "npy", "png"])
def test_every_kind_of_file_is_replaced_atomically(killed_writers, kind):
    folder, ended = killed_writers
    assert ended[kind] == signal.SIGKILL
    path = folder / kind / f"f.{kind}"
    partial = list(path.parent.glob(f".f.{kind}.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size == 100  # killed mid-write
    is_the_old_version = {  # whole, with 10 values (the new one has 10,000)
        "torch": lambda: len(torch.load(path, weights_only=True)["w"]) == 10,
        "json": lambda: len(json.loads(path.read_text())["values"]) == 10,
        "csv": lambda: len(read_metrics(path)) == 10,
        "npz": lambda: len(np.load(path)["a"]) == 10,
        "npy": lambda: len(np.load(path)) == 10,
        "png": lambda: imread(path).shape[:2] == (200, 200),  # 2 inches at 100 dpi; the new one is 7 wide
    }
    assert is_the_old_version[kind]()
    assert atomic.remove_leftovers(path.parent) == partial and not partial[0].exists()


# --- in-process: cheaper cases -----------------------------------------------------------------------
def _config(data_dir, out_dir, **overrides) -> Config:
    return Config(**{**SETTINGS, "data_dir": str(data_dir), "out_dir": str(out_dir), "width": 4, **overrides})


def test_non_finite_loss_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    run(_config(data_dir, tmp_path, epochs=2))
    good = (tmp_path / "last.pt").read_bytes()
    real_train_epoch = run_module.train_epoch

    def diverges_in_epoch_3(model, loader, optimizer, criterion, epoch, *args, **kwargs):
        calls = []

        def loss(logits, y):
            calls.append(1)
            return criterion(logits, y) * (float("nan") if epoch == 3 and len(calls) == 2 else 1.0)
        return real_train_epoch(model, loader, optimizer, loss, epoch, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_epoch", diverges_in_epoch_3)
    with pytest.raises(NonFiniteLossError, match="^non-finite loss at epoch 3, batch 2; lower lr") as e:
        run(_config(data_dir, tmp_path, epochs=3))
    assert "\n" not in str(e.value)
    assert (tmp_path / "last.pt").read_bytes() == good  # the last good epoch, untouched
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_finite_blow_up_stops_the_run_and_keeps_the_last_good_epoch(data_dir, tmp_path, monkeypatch):
    """The reference run's failure (results/cpu-reference-v1/diverged-016e480/): the weights grew by
    orders of magnitude and the loss reached 5e5 but stayed finite. The run must stop the way a NaN
    stops it, before the epoch's checkpoint, and resume from the epoch before."""
    run(_config(data_dir, tmp_path, epochs=2))
    good = (tmp_path / "last.pt").read_bytes()
    real_train_epoch = run_module.train_epoch
    factors = {3: 1e5}  # epoch 3's loss, as run sees it, times this; each step still trains for real

    def blows_up_in_epoch_3(model, loader, optimizer, criterion, epoch, *args, **kwargs):
        result = real_train_epoch(model, loader, optimizer, criterion, epoch, *args, **kwargs)
        result.loss *= factors.get(epoch, 1.0)
        return result

    monkeypatch.setattr(run_module, "train_epoch", blows_up_in_epoch_3)
    with pytest.raises(DivergedError, match=r"^training diverged at epoch 3: its mean loss \d\.\d+e\+0[45] is over "
                       r"10 times a uniform guess's \(2\.30\); lower lr$") as e:
        run(_config(data_dir, tmp_path, epochs=3))
    assert not isinstance(e.value, NonFiniteLossError)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2]
    del factors[3]  # the same command again, once whatever blew up is mended: epoch 3 from last.pt
    result = run(_config(data_dir, tmp_path, epochs=3))
    assert [r["epoch"] for r in result.rows] == [1, 2, 3]


def test_cli_reports_divergence_in_one_line(data_dir, tmp_path, monkeypatch, capsys):
    def diverges(*args, **kwargs):
        raise NonFiniteLossError("non-finite loss at epoch 1, batch 3; lower lr or check the data")
    monkeypatch.setattr(run_module, "train_epoch", diverges)
    config = _config(data_dir, tmp_path)
    code = run_module.main([f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()])
    err = capsys.readouterr().err
    assert code == 1 and err == "error: non-finite loss at epoch 1, batch 3; lower lr or check the data\n"


def test_the_cli_ends_with_the_notebooks_epoch_table(data_dir, tmp_path, capsys):
    from s11lib.utils.summary import epoch_table
    config = _config(data_dir, tmp_path, epochs=2)
    assert run_module.main([f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()]) == 0
    out = capsys.readouterr().out.rstrip()
    table = epoch_table(read_metrics(tmp_path / "metrics.csv"))
    assert out.endswith(table) and table.splitlines()[0].split()[:4] == ["epoch", "lr", "train", "loss"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["1", "2"]


def test_a_finished_run_is_not_trained_again(data_dir, tmp_path, monkeypatch):
    first = run(_config(data_dir, tmp_path, epochs=1))
    checkpoints = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt")}
    (tmp_path / "gradcam.png").unlink()  # e.g. killed while drawing the figures
    monkeypatch.setattr(run_module, "train_epoch", lambda *a, **k: pytest.fail("trained again"))
    again = run(_config(data_dir, tmp_path, epochs=1))
    assert again.rows == first.rows and torch.equal(again.heatmaps, first.heatmaps)
    assert {name: (tmp_path / name).read_bytes() for name in checkpoints} == checkpoints
    assert (tmp_path / "gradcam.png").exists()


def test_a_run_continues_only_with_its_own_settings(data_dir, tmp_path):
    run(_config(data_dir, tmp_path, epochs=2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=r"holds a run with other settings: lr 0.001 \(now 0.02\).*resume=False"):
        run(_config(data_dir, tmp_path, lr=0.02))
    with pytest.raises(CheckpointError, match="holds 2 epochs, more than epochs=1"):
        run(_config(data_dir, tmp_path, epochs=1))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_false_starts_over_and_a_fresh_out_dir_touches_nothing_else(data_dir, tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    run(_config(data_dir, first, epochs=2))
    (first / "notes.txt").write_text("mine")
    for derived in run_module.DERIVED_FILES:  # explore.ipynb's analysis of this best.pt
        (first / derived).write_text("of the first run's best.pt")
    first_files = {p.name: p.read_bytes() for p in first.iterdir()}

    run(_config(data_dir, other, epochs=1))  # a fresh out_dir
    assert {p.name: p.read_bytes() for p in first.iterdir()} == first_files

    restarted = run(_config(data_dir, first, epochs=1, resume=False))
    assert [r["epoch"] for r in restarted.rows] == [1]
    assert torch.load(first / "last.pt", weights_only=True)["epoch"] == 1
    assert (first / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert not any((first / derived).exists() for derived in run_module.DERIVED_FILES)
    same = torch.load(other / "last.pt", weights_only=True)["model"]  # same settings, same result
    _identical(torch.load(first / "last.pt", weights_only=True)["model"], same)


def test_a_run_stopped_in_its_first_epoch_starts_again_and_says_why(data_dir, tmp_path, capsys):
    # What an interrupt in epoch 1 leaves: config.json, no last.pt. The message used to blame
    # resume=False, which nobody had set.
    run(_config(data_dir, tmp_path, epochs=1, resume=False))
    (tmp_path / "last.pt").unlink()
    capsys.readouterr()
    run(_config(data_dir, tmp_path, epochs=1))
    out = capsys.readouterr().out
    assert "resume=False" not in out
    assert f"no last.pt in {tmp_path} to continue from: starting the run from epoch 1 (removed best.pt, " in out
    run(_config(data_dir, tmp_path, epochs=1, resume=False))
    assert f"resume=False: starting over in {tmp_path} (removed the previous run's files)" in capsys.readouterr().out


def test_two_runs_cannot_share_an_out_dir(data_dir, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with atomic.exclusive(tmp_path):  # as a run in progress holds it
        with pytest.raises(ValueError, match="another run is writing to"):
            run(_config(data_dir, tmp_path, epochs=1))
    assert list(tmp_path.iterdir()) == []


def test_an_fp16_run_resumes_with_its_loss_scale(data_dir, tmp_path, monkeypatch):
    # fp16 (a T4's precision; CPU autocast does it too): the GradScaler's state is in last.pt, and a
    # resumed run continues at the saved scale instead of starting over at 65536.
    run(_config(data_dir, tmp_path, epochs=1, amp="fp16"))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    # 4 steps from 65536: each overflow halves the scale, each clean step counts towards doubling it
    assert last["scaler"]["scale"] in {65536.0 / 2 ** k for k in range(5)} and last["scaler"]["_growth_tracker"] <= 4
    last["scaler"].update(scale=1024.0, _growth_tracker=3)  # as if the run had seen overflows
    torch.save(last, tmp_path / "last.pt")
    scales = []
    real_train_epoch = run_module.train_epoch

    def spy(*args):
        scaler = args[10]
        scales.append((scaler.get_scale(), scaler._get_growth_tracker()))
        return real_train_epoch(*args)

    monkeypatch.setattr(run_module, "train_epoch", spy)
    run(_config(data_dir, tmp_path, epochs=2, amp="fp16"))
    assert scales == [(1024.0, 3)]
