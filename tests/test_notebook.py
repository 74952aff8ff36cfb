"""papermill runs notebooks/train.ipynb on a small subset; every promised file appears, sane."""
import ast
import json
from pathlib import Path

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

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "train.ipynb"


def _parameters_cell() -> dict:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    values = {}
    for node in ast.parse("".join(tagged[0]["source"])).body:
        assert isinstance(node, ast.Assign), "the parameters cell holds only assignments"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_notebook_parameters_are_the_config_defaults():
    assert _parameters_cell() == Config().to_dict()
    assert Config().epochs == 40


def test_notebook_is_stored_without_outputs_or_is_from_a_named_run():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    has_outputs = any(c.get("outputs") for c in cells if c["cell_type"] == "code")
    first = "".join(cells[0]["source"])
    assert not has_outputs or "outputs come from" in first


@pytest.fixture(scope="module")
def executed(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("papermill")
    out_dir = tmp / "run"
    params = dict(data_dir=str(data_dir), out_dir=str(out_dir), download=False, epochs=2, batch_size=32,
                  train_subset=96, val_size=32, test_subset=100, lr=0.02, warmup_epochs=1)
    nb = pm.execute_notebook(str(NOTEBOOK), str(tmp / "train.ipynb"), parameters=params, kernel_name="python3",
                             progress_bar=False, cwd=str(tmp))
    return nb, out_dir, params


def test_every_file_appears(executed):
    _, out_dir, _ = executed
    expected = {"metrics.csv", "last.pt", "best.pt", "config.json", "misclassified.json", "misclassified.png",
                "gradcam.png", "gradcam.npz", "curves.png", "confusion.png", "test_predictions.npy"}
    assert {p.name for p in out_dir.iterdir()} == expected  # and no temporary files left behind


def test_metrics_csv(executed):
    _, out_dir, params = executed
    header = (out_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == METRIC_COLUMNS
    rows = read_metrics(out_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["train_acc"] <= 100 and 0 <= r["val_acc"] <= 100 and 0 <= r["test_acc"] <= 100
        assert r["train_loss"] > 0 and r["test_loss"] > 0 and r["seconds"] > 0 and r["lr"] > 0


def test_checkpoints(executed):
    _, out_dir, params = executed
    for name, keys in (("best.pt", {"model", "epoch", "config"}), ("last.pt", {"model", "optimizer", "scheduler"})):
        state = torch.load(out_dir / name, weights_only=True)
        assert keys <= set(state)
        assert state["config"]["epochs"] == 2 and state["config"]["data_dir"] == params["data_dir"]
        resnet18().load_state_dict(state["model"])  # the documented model takes it as it is


def test_misclassified_are_misclassified_by_best_pt(executed, data_dir):
    _, out_dir, _ = executed
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
    _, out_dir, params = executed
    items = json.loads((out_dir / "misclassified.json").read_text())["misclassified"]
    cam = np.load(out_dir / "gradcam.npz")
    assert cam["heatmaps"].shape == (20, 32, 32) and cam["heatmaps"].dtype == np.float32
    assert cam["heatmaps"].min() >= 0 and cam["heatmaps"].max() <= 1 and cam["heatmaps"].max() > 0
    assert cam["indices"].tolist() == [m["index"] for m in items]
    assert cam["targets"].tolist() == [m["pred"] for m in items]
    assert str(cam["layer"]) == Config().gradcam_layer


@pytest.mark.parametrize("name", ["misclassified.png", "gradcam.png", "curves.png", "confusion.png"])
def test_figures_are_real_pictures(executed, name):
    _, out_dir, _ = executed
    image = imread(out_dir / name)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_notebook_shows_the_logs_and_pictures(executed):
    nb, _, _ = executed
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Total params: 11,173,962" in text
    assert "Test set: Average loss:" in text and "Accuracy:" in text and "Epoch 2" in text
    pictures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert pictures == 4
