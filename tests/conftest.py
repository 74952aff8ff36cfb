"""Shared fixtures: where the CIFAR-10 data comes from, and tiny data sets in the standard layout.

Set S11_CIFAR10_DIR to the folder that holds `cifar-10-batches-py/` (.ci/run points it at
../shared/datasets/cifar10) and the data tests run on the real CIFAR-10. Unset, they run on a
small synthetic set that `write_cifar_layout` writes in the same layout, and the header of the
pytest run says so: nothing is skipped silently.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from s11lib.loaders import FOLDER

ENV = "S11_CIFAR10_DIR"
SYNTHETIC_TRAIN_PER_BATCH = 200  # x 5 batches = 1000 images, 100 per class
SYNTHETIC_TEST = 200  # 20 per class


def real_data_dir() -> Path | None:
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).resolve()  # the notebook tests run papermill in another folder
    if not (path / FOLDER).is_dir():
        raise pytest.UsageError(f"{ENV}={value} does not hold {FOLDER}/")
    return path


def pytest_configure(config):
    # The nbval references (tests/notebooks/) read their data and run folders from the environment,
    # which their kernels inherit: the data as an absolute path (the kernel runs in tests/notebooks/),
    # and a fresh run folder for the session, which train.ipynb writes and explore.ipynb reads.
    path = real_data_dir()
    if path:
        os.environ[ENV] = str(path)
    nbval = Path(tempfile.mkdtemp(prefix="s11-nbval-"))
    os.environ["S11_NBVAL_RUN_DIR"] = str(nbval / "s11-nbval-run")
    # compare.ipynb's sweep: the one sweep_scenario leaves behind (made before its first cell runs).
    os.environ["S11_NBVAL_SWEEP_DIR"] = str(nbval / "s11-nbval-sweep")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (the end-to-end ones; CI runs them)")


def is_nbval(item) -> bool:
    return type(item).__module__.startswith("nbval")


@pytest.hookimpl(tryfirst=True)  # the markers are set before -m selects by them
def pytest_collection_modifyitems(config, items):
    """Markers: real_data on every test whose checks change with the real CIFAR-10 (the nbval cells,
    and any test that asks for is_real_data, itself or through a fixture such as learned_run), so
    that `-m real_data` is the real-data pass; slow tests skipped, with the reason, without --runslow.

    nbval cells: train.ipynb's before explore.ipynb's (explore reads train's run), compare.ipynb's
    last; skipped, with the reason, without the real data (their stored outputs come from it)."""
    slow = pytest.mark.skip(reason="slow end-to-end test: bash scripts/test.sh --runslow runs it (CI does)")
    for item in items:
        if is_nbval(item) or "is_real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(slow)

    cells = [item for item in items if is_nbval(item)]
    if not cells:
        return
    order = {"train.ipynb": 0, "explore.ipynb": 1, "compare.ipynb": 2}
    cells.sort(key=lambda item: order.get(Path(str(item.fspath)).name, 2))  # stable: cell order kept
    first = next(i for i, item in enumerate(items) if is_nbval(item))
    items[:] = [item for item in items if not is_nbval(item)]
    items[first:first] = cells
    if real_data_dir() is None:
        skip = pytest.mark.skip(reason=f"nbval regression needs the real CIFAR-10: set {ENV}")
        for item in cells:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    """compare.ipynb's cells read the sweep that sweep_scenario makes: make it before the first one."""
    if is_nbval(item) and Path(str(item.fspath)).name == "compare.ipynb" \
            and real_data_dir() is not None:
        sweep_scenario(real_data_dir())


def pytest_report_header(config):
    path = real_data_dir()
    if path:
        return f"s11lib data: real CIFAR-10 from {path} ({ENV})"
    return f"s11lib data: SYNTHETIC stand-in (set {ENV} to the folder holding {FOLDER}/ for the real data)"


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3, 32, 32) images whose class shows in its colour (and stripe direction), plus noise."""
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    # Ten hues round the colour wheel: a per-sample norm (LayerNorm) erases brightness, not hue.
    from matplotlib.colors import hsv_to_rgb
    colours = 255 * hsv_to_rgb(np.stack([np.arange(10) / 10, np.full(10, 0.9), np.full(10, 0.9)], 1))
    angle = labels[:, None, None] * (np.pi / 10)
    stripes = 0.5 + 0.5 * np.sign(np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.8))
    images = colours[labels][:, :, None, None] * (0.6 + 0.4 * stripes[:, None])
    images += rng.normal(0, 25, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_batch(path: Path, data: np.ndarray, labels, batch_label: str = "batch") -> None:
    """One batch file as the official ones are: a pickled dict with 'data' (N, 3072) uint8 and 'labels'."""
    with open(path, "wb") as f:
        pickle.dump({"batch_label": batch_label, "labels": [int(v) for v in labels],
                     "data": data.reshape(len(data), -1), "filenames": [f"{i}.png" for i in range(len(data))]},
                    f, protocol=2)


def write_cifar_layout(root: Path, train_per_batch: int = SYNTHETIC_TRAIN_PER_BATCH,
                       test_size: int = SYNTHETIC_TEST, seed: int = 0) -> Path:
    """A complete `cifar-10-batches-py` folder of synthetic, learnable images under `root`."""
    rng = np.random.default_rng(seed)
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        labels = rng.permutation(np.arange(train_per_batch) % 10)
        write_batch(folder / f"data_batch_{i}", synthetic_images(labels, rng), labels, f"training batch {i} of 5")
    labels = rng.permutation(np.arange(test_size) % 10)
    write_batch(folder / "test_batch", synthetic_images(labels, rng), labels, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": train_per_batch, "num_vis": 3072,
                     "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f, protocol=2)
    return root


BENCH = Path(__file__).parents[1] / "bench"


def load_bench(name: str):
    """bench/NAME.py as a module. bench/ is scripts, not a package: a script finds its neighbours
    (`import pipelines`) because Python puts the script's folder first on sys.path, so the tests
    put it there too."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def fake_cuda(monkeypatch, count: int, capability: tuple[int, int], arch_list: list[str], name: str) -> None:
    """torch.cuda as a machine with `count` GPUs of this kind shows it to an installed torch built
    for `arch_list`."""
    import torch
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: count)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: name)


@pytest.fixture(scope="session")
def host_syncs():
    """bench/gpu_report.py's counter of the times a piece of work makes the host wait for the device."""
    return load_bench("gpu_report").host_syncs


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return write_cifar_layout(tmp_path_factory.mktemp("synthetic-cifar10"))


@pytest.fixture(scope="session")
def data_dir(synthetic_dir) -> Path:
    """The real CIFAR-10 when S11_CIFAR10_DIR is set, else the synthetic stand-in."""
    return real_data_dir() or synthetic_dir


@pytest.fixture(scope="session")
def is_real_data() -> bool:
    return real_data_dir() is not None


@pytest.fixture(scope="session")
def learned_run(data_dir, is_real_data, tmp_path_factory):
    """A short run that learns (test_train checks that it does); the explore tests browse it.

    A narrow ResNet18 (width 16): on the real data 256 SGD steps at batch 64
    on 4,096 images (~20 s on 2 cores); on the synthetic set, which the recipe learns perfectly in
    3 epochs, 14 steps at batch 128 on 1,000 (about 70% right: mistakes left to browse), inside a
    100-step warm-up to lr 0.8 (the defaults of 2026-11-30): at the shipped constant rate those 14
    steps leave a model whose Grad-CAM no longer passes the sanity check that
    tests/test_cam_checks.py expects of a trained one.
    """
    from s11lib.config import Config
    from s11lib.run import run

    # The recipe of 2026-12-01 to 12-05 (SGD, lr 0.4 per 512 after a 2-epoch warm-up, plateau patience 2,
    # wd 5e-4, every augmentation on every image): the heatmap checks' thresholds
    # (tests/test_cam_checks.py) were measured on the model it trains.
    sgd = dict(optimizer="sgd", weight_decay=5e-4, crop_prob=1.0, rotate_prob=1.0, cutout_prob=1.0)
    old_recipe = dict(**sgd, lr=0.4, warmup_epochs=2, plateau_patience=2)
    shape = (dict(epochs=4, batch_size=64, train_subset=4096, test_subset=500, **old_recipe) if is_real_data else
             dict(epochs=2, batch_size=128, train_subset=1000, test_subset=200, **sgd, lr=0.8, warmup_epochs=2))
    config = Config(device="cpu", data_dir=str(data_dir), out_dir=str(tmp_path_factory.mktemp("learned")),
                    download=False, width=16, val_size=0, progress=False, num_misclassified=5, **shape)
    return run(config)


@pytest.fixture
def small_data(tmp_path) -> Path:
    """A fresh, writable 120-image data set (100 train, 20 test) to break in a test."""
    return write_cifar_layout(tmp_path / "data", train_per_batch=20, test_size=20)


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`: what a crafted file would try."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- a sweep that is killed, fails and is resumed (tests/test_sweep.py, compare.ipynb's nbval) ---------
@dataclass
class SweepCall:
    code: int  # the sweep's exit status
    output: str  # what it printed
    summary: list  # summary.csv's rows after the call

    @property
    def statuses(self) -> dict:
        return {row["run"]: row["status"] for row in self.summary}


@dataclass
class SweepScenario:
    folder: Path  # the sweep's out_dir: complete after `third`
    spec: Path
    blocked: str  # the run whose folder was a file in the first two calls
    killed: str  # the run the first call was stopped in
    first: SweepCall  # sequential; SIGTERM once `killed` had saved an epoch
    lock_free_after_first: bool  # nothing (an orphaned kernel) holds `killed`'s folder any more
    killed_files_after_first: set  # the names in `killed`'s folder then
    notebook_time_after_first: int  # st_mtime_ns of the first run's executed notebook
    second: SweepCall  # --gpus 0,1 on two faked GPUs: finished runs skipped, `killed` continued
    third: SweepCall  # the blocking file removed: only `blocked` runs
    notebook_time_after_third: int


_scenario: dict = {}  # "sweep": the SweepScenario, or the error that making it raised


def sweep_scenario(data_dir: Path) -> SweepScenario:
    """tests/refresh_notebooks.py's regression sweep (2 learning rates x 2 seeds), made in
    S11_NBVAL_SWEEP_DIR the hard way, once per session (50 to 65 s on 2 cores):

    1. `python -m s11lib.sweep SPEC` with the second run's folder taken by a file (it fails, the
       others go on), stopped with SIGTERM once the third run has saved its first epoch;
    2. the same spec again, in this process, with `--gpus 0,1` on two faked GPUs: the first run is
       skipped, the third continues from its last.pt beside the fourth, the second fails again;
    3. the file removed, the same command once more: the second run alone runs.

    Runs on the CPU are deterministic, so the sweep ends as an uninterrupted one: compare.ipynb's
    stored outputs, made from one (refresh_notebooks.py), say so."""
    if "sweep" not in _scenario:
        try:
            _scenario["sweep"] = _make_sweep_scenario(data_dir)
        except Exception as e:  # noqa: BLE001 - reported to every test that asks, not made again
            _scenario["sweep"] = e
    if isinstance(_scenario["sweep"], BaseException):
        raise _scenario["sweep"]
    return _scenario["sweep"]


def _make_sweep_scenario(data_dir: Path) -> SweepScenario:
    import contextlib
    import io
    import signal
    import subprocess
    import sys
    import time

    import refresh_notebooks

    from s11lib import sweep
    from s11lib.utils import atomic

    folder = Path(os.environ["S11_NBVAL_SWEEP_DIR"])
    spec = refresh_notebooks.write_sweep_spec(folder.parent / "sweep.yaml", folder, str(data_dir))
    names = [p.name for p in sweep.read_spec(spec).points]
    blocked, killed = names[1], names[2]
    folder.mkdir(parents=True)
    (folder / blocked).write_text("in the way")

    def summary() -> list:
        return sweep.read_summary(folder / sweep.SUMMARY)

    def call_outside() -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "s11lib.sweep", str(spec)], capture_output=True, text=True,
                              timeout=600)
        return done.returncode, done.stdout + done.stderr

    process = subprocess.Popen([sys.executable, "-m", "s11lib.sweep", str(spec)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    metrics = folder / killed / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the sweep ended before its third run trained:\n{process.communicate()[0]}")
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    first = SweepCall(process.returncode, output, summary())
    try:
        with atomic.exclusive(folder / killed):
            lock_free = True
    except ValueError:
        lock_free = False
    killed_files = {p.name for p in (folder / killed).iterdir()}
    notebook = folder / names[0] / "train.ipynb"
    notebook_time = notebook.stat().st_mtime_ns

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(printed):
        fake_cuda(patch, 2, (8, 0), ["sm_80"], "NVIDIA A100 (faked)")
        code = sweep.main([str(spec), "--gpus", "0,1"])
    second = SweepCall(code, printed.getvalue(), summary())

    (folder / blocked).unlink()
    third = SweepCall(*call_outside(), summary())
    return SweepScenario(folder, spec, blocked, killed, first, lock_free, killed_files, notebook_time, second, third,
                         notebook.stat().st_mtime_ns)


@pytest.fixture(scope="session")
def swept(data_dir) -> SweepScenario:
    return sweep_scenario(data_dir)
