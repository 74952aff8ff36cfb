"""The learning-rate range test (s11lib/lr_find.py): the rates it sweeps, the model and optimiser
left as they were, the suggestion inside the range and at the steepest fall, the picture, the stop
at a blow-up, and one-line errors, on a narrow model and the test data."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from s11lib import lr_find as finder
from s11lib.config import Config
from s11lib.loaders import build_loaders
from s11lib.models import resnet18
from s11lib.optim import make_optimizer
from s11lib.transforms import test_transforms, train_transforms

CPU = torch.device("cpu")
NARROW = dict(device="cpu", width=8, batch_size=64, train_subset=640, val_size=64, test_subset=64, download=False,
              progress=False)


@pytest.fixture(scope="module")
def swept(data_dir, tmp_path_factory):
    plot = tmp_path_factory.mktemp("lr_find") / "lr_find.png"
    return finder.lr_find(Config(data_dir=str(data_dir), **NARROW), start_lr=1e-4, end_lr=10.0, steps=30,
                          plot=plot), plot


def test_the_suggestion_lies_inside_the_swept_range_and_the_picture_is_written(swept):
    result, plot = swept
    assert 1e-4 <= result.suggestion <= result.lrs[-1] <= 10.0
    assert result.suggestion in result.lrs
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(plot.parent.glob(".*"))  # written atomically: no temporary file left


def test_the_rates_rise_exponentially_from_start_to_end(swept):
    result, _ = swept
    ratios = result.lrs[1:] / result.lrs[:-1]
    np.testing.assert_allclose(ratios, (10.0 / 1e-4) ** (1 / 29), rtol=1e-9)
    assert result.lrs[0] == pytest.approx(1e-4) and len(result.lrs) == len(result.losses) <= 30


@pytest.mark.parametrize("optimizer, start, end", [("adam", 1e-5, 1e-3), ("sgd", 1e-3, 1e-1)])
def test_each_step_trains_at_its_rate_and_the_model_and_optimiser_are_left_as_they_were(data_dir, optimizer, start,
                                                                                        end):
    config = Config(data_dir=str(data_dir), optimizer=optimizer, **NARROW)
    data = build_loaders(config.data_dir, config.batch_size, CPU, train_transforms(), test_transforms(), False,
                         config.train_subset, config.test_subset, config.val_size)
    torch.manual_seed(0)
    model = resnet18(width=8)
    optimizer = make_optimizer(model, config, CPU)
    images, labels = next(iter(data.train))
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()  # a state to keep: SGD's momentum, Adam's moments and step count
    optimizer.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(optimizer.state_dict()["state"])
    assert saved and all(torch.is_tensor(v) for state in saved.values() for v in state.values())
    used = []
    optimizer.register_step_pre_hook(lambda opt, *_: used.append([g["lr"] for g in opt.param_groups]))
    result = finder.lr_range_test(model, optimizer, data.train, CPU, start, end, steps=12, progress=False)
    assert len(result.lrs) == 12  # no blow-up in the range: all of it, over more than one pass of the 9 batches
    assert used == [[lr] * len(optimizer.param_groups) for lr in result.lrs.tolist()]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert after.keys() == saved.keys()
    assert all(torch.equal(after[p][name], value) for p, state in saved.items() for name, value in state.items())
    assert [g["lr"] for g in optimizer.param_groups] == [config.peak_lr] * len(optimizer.param_groups)
    assert model.training


def test_the_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = 1e-5 * (1e6) ** (np.arange(100) / 99)
    x = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 2)))  # falls fastest at 1e-2
    losses[x > -0.5] += 20 * (x[x > -0.5] + 0.5) ** 2  # and blows up past 0.3
    assert finder.suggest(lrs, losses) == pytest.approx(1e-2, rel=0.15)
    flat = np.full(100, 2.3)
    assert finder.suggest(lrs, flat) == lrs[0]  # nothing fell: the smoothed minimum's own rate


def test_smoothing_is_the_bias_corrected_moving_average():
    losses = np.array([2.0, 4.0, 1.0, 3.0])
    b = finder.SMOOTHING
    plain, average = [], 0.0
    for i, v in enumerate(losses):
        average = b * average + (1 - b) * v
        plain.append(average / (1 - b ** (i + 1)))
    np.testing.assert_allclose(finder.smooth(losses), plain)
    assert finder.smooth(losses)[0] == 2.0 and np.allclose(finder.smooth(np.full(5, 3.0)), 3.0)


def test_the_sweep_stops_where_the_loss_blows_up(data_dir, tmp_path):
    result = finder.lr_find(Config(data_dir=str(data_dir), **NARROW), start_lr=1e-3, end_lr=1e4, steps=40, plot=None)
    assert len(result.lrs) < 40 and np.isfinite(result.losses).all()
    assert result.suggestion < result.lrs[-1]


@pytest.mark.parametrize("options, message", [
    (["--steps", "3"], "error: steps must be an integer of at least 10, got 3"),
    (["--start-lr", "0"], "error: start_lr must be a positive number, got 0.0"),
    (["--end-lr", "1e-6"], "error: end_lr must be a number above start_lr=1e-05, got 1e-06"),
    (["--stpes", "50"], "error: unknown option --stpes (did you mean --steps?)"),
    (["--width", "0"], "error: width must be at least 1, got 0"),
])
def test_bad_options_are_one_line_and_write_nothing(options, message, data_dir, tmp_path, capsys):
    plot = tmp_path / "p.png"
    try:
        code = finder.main(["--data-dir", str(data_dir), "--plot", str(plot), *options])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not plot.exists()


@pytest.mark.parametrize("optimizer, scale", [("sgd", 512 / 64), ("adam", 1.0)])
def test_the_command_prints_the_suggestion_per_step_and_as_the_runs_lr(data_dir, tmp_path, capsys, optimizer, scale):
    # SGD's lr is per 512 images, Adam's the rate itself at any batch size.
    plot = tmp_path / "p.png"
    options = [a for k, v in NARROW.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert finder.main(["--data-dir", str(data_dir), *options, "--optimizer", optimizer, "--steps", "20",
                        "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    rate, as_lr = out[-1].split("suggested rate: ")[1].split(" at batch 64 (lr=")
    assert float(as_lr.split(" ")[0].rstrip(",")) == pytest.approx(float(rate) * scale, rel=1e-2)  # 3 digits each
    assert ("per 512" in as_lr) == (optimizer == "sgd") and plot.is_file()


def test_the_notebook_runs_under_papermill_and_shows_the_picture(data_dir, tmp_path):
    import nbformat
    import papermill as pm

    root = Path(__file__).parents[1]
    params = dict(data_dir=str(data_dir), download=False, device="cpu", width=8, batch_size=64, train_subset=640,
                  val_size=64, steps=20, plot=str(tmp_path / "lr_find.png"))
    pm.execute_notebook(str(root / "notebooks" / "lr_find.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path), execution_timeout=300)
    last = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1]
    text = "".join(o.text for o in last.outputs if o.output_type == "stream" and o.name == "stdout")
    assert text.startswith("swept ") and "suggested rate: " in text and "at batch 64 (lr=" in text
    assert any("image/png" in o.get("data", {}) for o in last.outputs)
    assert (tmp_path / "lr_find.png").is_file()
