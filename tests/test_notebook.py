"""The notebooks: papermill runs train.ipynb on a small subset and every promised file appears,
sane; the nbval references are from the current notebooks; the Colab cell acts only in Colab."""
import ast
import io
import json
import subprocess
import sys
import tomllib
import types
from contextlib import redirect_stdout
from pathlib import Path

import nbformat

import numpy as np
import papermill as pm
import pytest
import torch
from matplotlib.image import imread

from s11lib.config import Config
from s11lib.constants import CLASSES
from s11lib.loaders import load_cifar10
from s11lib.models import resnet18
from s11lib.run import METRIC_COLUMNS, read_metrics
from s11lib.transforms import test_transforms

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "train.ipynb"
NOTEBOOKS = ("train", "explore", "compare")  # those with an nbval reference in tests/notebooks/
SHIPPED = (*NOTEBOOKS, "lr_find")  # every notebook in notebooks/
REFRESH = "S11_CIFAR10_DIR=../shared/datasets/cifar10 .venv/bin/python tests/refresh_notebooks.py"


@pytest.fixture(scope="module")
def publish_run():
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "publish_run.py"))


def _parameters_cell() -> dict:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    values = {}
    for node in ast.parse("".join(tagged[0]["source"])).body:
        assert isinstance(node, ast.Assign), "the parameters cell holds only assignments"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_train_parameters_are_the_config_defaults():
    assert _parameters_cell() == Config().to_dict()
    assert Config().epochs == 40


@pytest.mark.parametrize("name", SHIPPED)
def test_notebooks_are_stored_without_outputs_or_with_a_published_runs(name, publish_run):
    """A shipped notebook has no outputs, except train.ipynb as scripts/publish_run.py stores it:
    its first cell names the run, and what it shows is that run's (the results and images it names)."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    note = nb.cells[0] if publish_run["STORED_OUTPUTS"] in nb.cells[0].metadata.get("tags", []) else None
    if name != "train" or note is None:
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert note is None, "only train.ipynb is stored with outputs"
        return
    assert not [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])], \
        "papermill's injected-parameters cell must not be kept: Colab would run it"
    assert all(c.get("outputs") for c in nb.cells if c.cell_type == "code" and not c.source.startswith("# Colab only")
               and "parameters" not in c.metadata.get("tags", [])), "every output of the run is stored"
    results, images = (ROOT / note.metadata["s11lib"][key] for key in ("results", "images"))
    assert f"]({Path('..') / note.metadata['s11lib']['results'] / 'README.md'})" in note.source
    publish_run["check_train_outputs"](nb, {n: (images / n).read_bytes() for n in publish_run["RUN_PICTURES"]},
                                       read_metrics(results / "metrics.csv"))


def test_explore_parameters_are_literals():
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    names = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}
    assert names == {"run_dir": "runs/train", "data_dir": None, "device": "auto", "layer": "layer3", "alpha": 0.5,
                     "static_mistakes": 6, "neighbours": True, "calibration_bins": 15, "correct_sample": 100,
                     "check_steps": 8, "check_seed": 0}


# --- the nbval references (tests/notebooks/) ---------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_outputs_are_from_the_current_notebook(name):
    """nbval compares outputs with tests/notebooks/NAME.ipynb; this fails when the notebook changed since."""
    import refresh_notebooks

    source = refresh_notebooks.shipped(name)
    reference = nbformat.read(ROOT / "tests" / "notebooks" / f"{name}.ipynb", as_version=4)
    injected = [c for c in reference.cells if "injected-parameters" in c.metadata.get("tags", [])]
    kept = [c for c in reference.cells if c not in injected]
    stale = f"notebooks/{name}.ipynb changed after its stored outputs were made; refresh them: {REFRESH}"
    assert [(c.cell_type, c.source) for c in kept] == [(c.cell_type, c.source) for c in source.cells], stale
    assert [c.source for c in injected] == [refresh_notebooks.parameters_cell(name).source], stale
    assert all(c.get("outputs") or c.source.startswith("#") or c.cell_type != "code" for c in kept[2:]), \
        "a reference without outputs compares nothing"


# --- Colab --------------------------------------------------------------------------------------------
def _colab_cell(name: str) -> str:
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.source.startswith("# Colab only"), "the first code cell is the Colab cell"
    assert nb.metadata.get("accelerator") == "GPU"  # Colab opens it on a GPU runtime
    return first_code.source


def _repository() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


@pytest.mark.parametrize("name", SHIPPED)
def test_colab_cell_does_nothing_outside_colab(name, monkeypatch):
    import subprocess
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    out = io.StringIO()
    with redirect_stdout(out):
        exec(_colab_cell(name), {})
    assert out.getvalue() == ""


@pytest.mark.parametrize("name", SHIPPED)
def test_colab_cell_in_colab_installs_enables_widgets_and_reports_the_gpu(name, monkeypatch):
    import subprocess
    commands, enabled = [], []
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: enabled.append(True))
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append((command, kwargs)))
    out = io.StringIO()
    with redirect_stdout(out):
        exec(_colab_cell(name), {})
    ((command, kwargs),) = commands
    assert command[1:4] == ["-m", "pip", "install"] and command[-1] == f"s11lib @ git+{_repository()}"
    assert "--no-deps" in command  # Colab's torch, torchvision and ipywidgets stay as they are
    assert kwargs == {"check": True} and enabled == [True]
    assert out.getvalue().startswith("GPU: ")


def test_readme_open_in_colab_links_point_at_the_repository():
    readme = (ROOT / "README.md").read_text()
    colab = _repository().replace("https://github.com/", "https://colab.research.google.com/github/")
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(SHIPPED)
    for name in SHIPPED:
        assert f"({colab}/blob/main/notebooks/{name}.ipynb)" in readme


@pytest.fixture(scope="module")
def executed(data_dir, tmp_path_factory):
    """The training notebook run as the README's main job runs it: scripts/train.sh's command."""
    tmp = tmp_path_factory.mktemp("papermill")
    out_dir = tmp / "run"
    params = dict(data_dir=str(data_dir), out_dir=str(out_dir), download=False, epochs=2, batch_size=32,
                  train_subset=96, val_size=32, test_subset=100)  # the shipped recipe
    args = [a for name, value in params.items() for a in ("-p", name, str(value))]
    done = subprocess.run([sys.executable, "-m", "s11lib.notebook", *args], cwd=tmp, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nb = nbformat.read(out_dir / "train.ipynb", as_version=4)  # the executed notebook lives with its run
    return nb, out_dir, params, done


def test_the_run_shows_on_the_terminal(executed):
    # papermill alone prints a cell counter; train.sh streams what the notebook prints, as it comes.
    *_, done = executed
    assert "Total params: 11,173,962" in done.stdout
    assert done.stdout.count("Test set: Average loss:") == 3  # two epochs, then best.pt's
    assert "Epoch 2: 100%" in done.stderr  # the epoch bars
    assert done.stderr.rstrip().endswith(f"the executed notebook: {executed[1] / 'train.ipynb'}; "
                                         f"the run's files: {executed[1]}")


def test_an_unknown_parameter_stops_papermill_itself(data_dir, tmp_path):
    # Through papermill's own API (no train.sh): the notebook checks what was injected, and stops
    # before any training with one line naming the closest parameter. papermill only warns.
    params = dict(data_dir=str(data_dir), out_dir=str(tmp_path / "run"), download=False, epoch=2)
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                            progress_bar=False, cwd=str(tmp_path), execution_timeout=300)
    assert e.value.ename == "ValueError"
    assert e.value.evalue.startswith("unknown parameter 'epoch' (did you mean 'epochs'?)")
    assert not (tmp_path / "run").exists()


def test_every_file_appears(executed):
    _, out_dir, *_ = executed
    expected = {"metrics.csv", "last.pt", "best.pt", "config.json", "run.json", "misclassified.json",
                "misclassified.png", "gradcam.png", "gradcam.npz", "curves.png", "confusion.png", "test_predictions.npy",
                "train.ipynb"}
    assert {p.name for p in out_dir.iterdir()} == expected  # and no temporary files left behind


def test_metrics_csv(executed):
    _, out_dir, params, _ = executed
    header = (out_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == METRIC_COLUMNS
    rows = read_metrics(out_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["train_acc"] <= 100 and 0 <= r["val_acc"] <= 100 and 0 <= r["test_acc"] <= 100
        assert r["train_loss"] > 0 and r["test_loss"] > 0 and r["seconds"] > 0 and r["lr"] > 0


def test_checkpoints(executed):
    _, out_dir, params, _ = executed
    for name, keys in (("best.pt", {"model", "epoch", "config"}), ("last.pt", {"model", "optimizer", "scheduler"})):
        state = torch.load(out_dir / name, weights_only=True)
        assert keys <= set(state)
        assert state["config"]["epochs"] == 2 and state["config"]["data_dir"] == params["data_dir"]
        resnet18().load_state_dict(state["model"])  # the documented model takes it as it is


def test_misclassified_are_misclassified_by_best_pt(executed, data_dir):
    _, out_dir, *_ = executed
    report = json.loads((out_dir / "misclassified.json").read_text())
    assert report["checkpoint"] == "best.pt"
    items = report["misclassified"]
    assert len(items) == 20
    images, labels = load_cifar10(data_dir, train=False)
    idx = torch.tensor([m["index"] for m in items])
    model = resnet18().eval()
    model.load_state_dict(torch.load(out_dir / "best.pt", weights_only=True)["model"])
    with torch.no_grad():
        probs = model(test_transforms()(images[idx])).softmax(1)
    for m, p in zip(items, probs):
        assert labels[m["index"]] == m["label"] and m["pred"] != m["label"]
        assert int(p.argmax()) == m["pred"] and p.max().item() == pytest.approx(m["confidence"], abs=1e-4)
        assert m["label_name"] == CLASSES[m["label"]]
    # The same predictions for the whole (subset) test set.
    preds = np.load(out_dir / "test_predictions.npy")
    with torch.no_grad():
        all_preds = model(test_transforms()(images[:100])).argmax(1).numpy()
    np.testing.assert_array_equal(preds, all_preds)


def test_gradcam_npz_is_on_the_same_20(executed):
    _, out_dir, params, _ = executed
    items = json.loads((out_dir / "misclassified.json").read_text())["misclassified"]
    cam = np.load(out_dir / "gradcam.npz")
    assert cam["heatmaps"].shape == (20, 32, 32) and cam["heatmaps"].dtype == np.float32
    assert cam["heatmaps"].min() >= 0 and cam["heatmaps"].max() <= 1 and cam["heatmaps"].max() > 0
    assert cam["indices"].tolist() == [m["index"] for m in items]
    assert cam["targets"].tolist() == [m["pred"] for m in items]
    assert str(cam["layer"]) == Config().gradcam_layer


@pytest.mark.parametrize("name", ["misclassified.png", "gradcam.png", "curves.png", "confusion.png"])
def test_figures_are_real_pictures(executed, name):
    _, out_dir, *_ = executed
    image = imread(out_dir / name)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_notebook_shows_the_logs_and_pictures(executed):
    nb, *_ = executed
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Total params: 11,173,962" in text
    assert "Test set: Average loss:" in text and "Accuracy:" in text and "Epoch 2" in text
    pictures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert pictures == 4
