"""Every bad input is a one-line error before any training starts, and nothing is written.

One test per case, each through the entry point a user calls (`run`, or the CLI for settings).
docs/failures.md lists the cases; the last test keeps that list and this file in step.
"""
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import s11lib.run as run_module
from conftest import RunsCode, write_batch
from s11lib.config import Config
from s11lib.loaders import FOLDER
from s11lib.run import main, run

FAILURES = Path(__file__).parents[1] / "docs" / "failures.md"


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Training must not even start: a call to train_epoch fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started on bad input")
    monkeypatch.setattr(run_module, "train_epoch", refuse)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    return tmp_path / "out"


def _config(data_dir, out_dir, **overrides) -> Config:
    values = dict(data_dir=str(data_dir), out_dir=str(out_dir), download=False, width=4, epochs=1, batch_size=16,
                  val_size=20, progress=False, num_misclassified=5)
    return Config(**{**values, **overrides})


def _snapshot(folder: Path):
    """Every file under folder with its bytes and mtime; None when folder does not exist."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(config: Config, pattern: str) -> str:
    """run(config) fails with a one-line ValueError matching pattern, leaving out_dir as it was."""
    out_dir = Path(config.out_dir)
    before = _snapshot(out_dir)
    with pytest.raises(ValueError, match=pattern) as e:
        run(config)
    message = str(e.value)
    assert "\n" not in message, message
    assert _snapshot(out_dir) == before, "a file was written or changed"
    return message


def refused_by_cli(args: list[str], pattern: str, out_dir: Path, capsys) -> None:
    """The CLI prints one line, 'error: ...', exits 2, and writes nothing."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors (an unknown option, a value of the wrong type) exit
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not out_dir.exists()


# --- the data ----------------------------------------------------------------------------------
def test_missing_data_folder(tmp_path, out_dir):
    message = refused(_config(tmp_path / "nowhere", out_dir), "no such folder")
    assert str(tmp_path / "nowhere" / FOLDER) in message and "download=True" in message


def test_folder_without_the_batches(tmp_path, out_dir):
    (tmp_path / "empty" / FOLDER).mkdir(parents=True)
    refused(_config(tmp_path / "empty", out_dir), "missing data_batch_1")


def test_truncated_batch(small_data, out_dir):
    path = small_data / FOLDER / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    refused(_config(small_data, out_dir), "data_batch_3: not a readable CIFAR-10 batch")


def test_corrupt_batch(small_data, out_dir):
    (small_data / FOLDER / "test_batch").write_bytes(np.random.default_rng(0).bytes(4096))
    refused(_config(small_data, out_dir), "test_batch: not a readable CIFAR-10 batch")


@pytest.mark.parametrize("data", [np.zeros((20, 3000), np.uint8), np.zeros((20, 3, 32, 32), np.uint8)],
                         ids=["3000-values", "4d"])
def test_wrong_array_shape(small_data, out_dir, data):
    with open(small_data / FOLDER / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [0] * len(data)}, f, protocol=2)
    refused(_config(small_data, out_dir), r"shape \(N, 3072\)")


@pytest.mark.parametrize("dtype", [np.float32, np.int64, object])
def test_wrong_array_dtype(small_data, out_dir, dtype):
    write_batch(small_data / FOLDER / "data_batch_2", np.ones((20, 3072), dtype), [0] * 20)
    refused(_config(small_data, out_dir), "data_batch_2")


@pytest.mark.parametrize("labels", [[0] * 19 + [10], [-1] + [0] * 19], ids=["10", "-1"])
def test_labels_out_of_range(small_data, out_dir, labels):
    write_batch(small_data / FOLDER / "test_batch", np.zeros((20, 3072), np.uint8), labels)
    refused(_config(small_data, out_dir), r"test_batch: labels must lie in 0\.\.9, found")


def test_fewer_labels_than_images(small_data, out_dir):
    write_batch(small_data / FOLDER / "test_batch", np.zeros((20, 3072), np.uint8), [0] * 19)
    refused(_config(small_data, out_dir), r"20 images but labels of shape \(19,\)")


def test_crafted_data_pickle_cannot_run_code(small_data, out_dir, tmp_path):
    marker = tmp_path / "pwned"
    with open(small_data / FOLDER / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(marker), "labels": [0]}, f, protocol=2)
    refused(_config(small_data, out_dir), "data_batch_1.*(posix|os).system.*not allowed")
    assert not marker.exists()
    pickle.loads((small_data / FOLDER / "data_batch_1").read_bytes())  # the payload is real:
    assert marker.exists()  # an ordinary unpickler runs it


# --- checkpoints in out_dir ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_crafted_checkpoint_cannot_run_code(small_data, out_dir, tmp_path, name):
    """A checkpoint in out_dir is loaded to resume; a crafted one must fail without running."""
    config = _config(small_data, out_dir)
    marker = tmp_path / "pwned"
    out_dir.mkdir()
    if name == "best.pt":  # a genuine last.pt beside it, so that best.pt is read too
        from s11lib import checkpoint
        from s11lib.models import resnet18
        model = resnet18(width=4)
        optimizer = run_module.make_optimizer(model, config, torch.device("cpu"))
        checkpoint.save_last(out_dir / "last.pt", model, optimizer, run_module.make_scheduler(optimizer, config),
                             torch.amp.GradScaler("cpu", enabled=False), None, 1, config, [{"epoch": 1}], 1, 10.0,
                             "val_acc", torch.device("cpu"))
    torch.save({"model": RunsCode(marker), "epoch": 1}, out_dir / name)
    refused(config, f"{name} cannot be loaded safely .*unsupported GLOBAL (posix|os).system")
    assert not marker.exists()
    torch.load(out_dir / name, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_truncated_checkpoint(small_data, out_dir):
    out_dir.mkdir()
    (out_dir / "last.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    refused(_config(small_data, out_dir), "last.pt cannot be loaded safely")


def test_checkpoint_of_another_run(small_data, out_dir):
    out_dir.mkdir()
    torch.save({"weights": torch.zeros(3)}, out_dir / "last.pt")
    refused(_config(small_data, out_dir), r"last.pt is not a checkpoint of this s11lib version \(no best, config, ema, epoch")


# --- the settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, pattern", [
    ("epochs", "0", "epochs must be at least 1, got 0"),
    ("epochs", "-3", "epochs must be at least 1, got -3"),
    ("batch-size", "0", "batch_size must be at least 1, got 0"),
    ("batch-size", "-1", "batch_size must be at least 1, got -1"),
    ("lr", "0", "lr must be above 0, got 0.0"),
    ("lr", "-0.1", "lr must be above 0, got -0.1"),
])
def test_epochs_batch_size_or_lr_not_positive(small_data, out_dir, capsys, option, value, pattern):
    refused_by_cli(["--data-dir", str(small_data), "--out-dir", str(out_dir), "--download", "false",
                    f"--{option}", value], pattern, out_dir, capsys)


def test_unknown_config_key(small_data, out_dir, capsys):
    # A typo names the closest parameter, in each entry point: a dict (config.json, Python callers),
    # the CLI (where --epoch is not taken as an abbreviation of --epochs), and a notebook's cells
    # (tests/test_notebook.py runs the notebook with papermill).
    with pytest.raises(ValueError, match=r"^unknown parameter 'epoch' \(did you mean 'epochs'\?\), 'zzz';"):
        Config.from_dict({"epoch": 3, "zzz": 1, "lr": 0.1})
    refused_by_cli(["--data-dir", str(small_data), "--out-dir", str(out_dir), "--epoch", "2"],
                   r"unknown option --epoch \(did you mean --epochs\?\)", out_dir, capsys)
    refused_by_cli(["--data-dir", str(small_data), "--out-dir", str(out_dir), "--batchsize=64"],
                   r"unknown option --batchsize \(did you mean --batch-size\?\)", out_dir, capsys)
    refused_by_cli(["--data-dir", str(small_data), "--out-dir", str(out_dir), "--epochs", "two"],
                   r"argument --epochs: invalid int value: 'two'", out_dir, capsys)
    # In a notebook: the names its parameters cell and papermill's injected cell assign (IPython's In).
    history = ["# Parameters (papermill overrides these)\nepochs = 40\nlr = 0.8\n", "x = 1\n",
               "# Parameters\nepoch = 2\nPAPERMILL_OUTPUT_PATH = 'a.ipynb'\n"]
    with pytest.raises(ValueError, match=r"^unknown parameter 'epoch' \(did you mean 'epochs'\?\);"):
        Config.from_notebook({"In": history, "epochs": 40, "lr": 0.8, "epoch": 2, "x": 1})
    # The notebook's own later variables (x here) are no parameters and are not checked.
    config = Config.from_notebook({"In": history[:2], "epochs": 3, "x": 1})
    assert config.epochs == 3 and config.lr == Config().lr


def test_parameter_of_the_wrong_type(small_data, out_dir, capsys):
    # papermill passes -p values as it reads them, and Python callers pass anything: a wrong type is
    # a one-line error, not a TypeError from deep inside a comparison.
    for values, message in (({"epochs": "two"}, "epochs must be an integer, got 'two' (str)"),
                            ({"batch_size": 64.0}, "batch_size must be an integer, got 64.0 (float)"),
                            ({"download": 1}, "download must be True or False, got 1 (int)"),
                            ({"train_subset": "all"}, "train_subset must be an integer or None, got 'all' (str)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            _config(small_data, out_dir, **values)
    config = _config(small_data, Path(out_dir), lr=1)  # an int is a number; a path is a string
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.out_dir == str(out_dir)
    assert not out_dir.exists()


def test_unknown_plateau_metric(small_data, out_dir, capsys):
    refused_by_cli(["--data-dir", str(small_data), "--out-dir", str(out_dir), "--plateau-metric", "train_loss"],
                   "plateau_metric must be one of", out_dir, capsys)


def test_unknown_gradcam_layer(small_data, out_dir):
    refused(_config(small_data, out_dir, gradcam_layer="layer9"), "unknown gradcam_layer 'layer9'")


@pytest.mark.parametrize("subset, pattern", [("train_subset", "train_subset must be between 1 and 100"),
                                             ("test_subset", "test_subset must be between 1 and 20")])
def test_subset_larger_than_the_data_set(small_data, out_dir, subset, pattern):
    refused(_config(small_data, out_dir, **{subset: 1000}), pattern)


def test_validation_split_as_large_as_the_training_set(small_data, out_dir, capsys):
    refused(_config(small_data, out_dir, val_size=100),
            r"val_size=100 holds out all of the 100 training images; pass val_size=10 \(a tenth\) or 0")
    # A subset smaller than the default split (the CPU smoke run without --val-size): the
    # error names what to pass, and comes before the data is read.
    refused_by_cli(["--data-dir", str(small_data), "--out-dir", str(out_dir), "--train-subset", "80"],
                   r"val_size=5000 holds out all of the train_subset=80 images; pass val_size=8 \(a tenth\) or 0",
                   out_dir, capsys)


def test_out_dir_under_a_file(small_data, tmp_path):
    # Root ignores permission bits (CI may run as root); a path through a file is unwritable for anyone.
    (tmp_path / "a-file").write_text("")
    refused(_config(small_data, tmp_path / "a-file" / "out"), "is not writable")


def test_out_dir_is_a_file(small_data, tmp_path):
    (tmp_path / "out").write_text("notes")
    refused(_config(small_data, tmp_path / "out"), "is a file, not a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_on_a_machine_without_a_gpu(small_data, out_dir):
    refused(_config(small_data, out_dir, device="cuda"), "device='cuda' but this machine has no CUDA GPU")


def test_unknown_device(small_data, out_dir):
    refused(_config(small_data, out_dir, device="tpu"), "unknown device 'tpu'")


# --- docs/failures.md lists every case ----------------------------------------------------------------
def test_docs_list_every_case():
    page = FAILURES.read_text()
    cases = sorted({name[len("test_"):] for name in globals() if name.startswith("test_")} - {"docs_list_every_case"})
    missing = [case for case in cases if f"`{case}`" not in page]
    assert not missing, f"docs/failures.md does not name: {missing}"
