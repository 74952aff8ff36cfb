"""scripts/publish_run.py: a finished run's files into results/, checked; its pictures into images/."""
from __future__ import annotations

import base64
import json
import runpy
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest

from s11lib.run import read_metrics, write_metrics
from s11lib.utils.summary import assignment_log

SCRIPT = Path(__file__).parents[1] / "scripts" / "publish_run.py"


@pytest.fixture(scope="module")
def publish_run():
    return runpy.run_path(str(SCRIPT))


@pytest.fixture
def run_copy(learned_run, tmp_path) -> Path:
    """The learned run's folder, copied so that a test may break it."""
    return Path(shutil.copytree(learned_run.out_dir, tmp_path / "run"))


def test_publish_copies_the_small_files_and_the_log_in_the_assignments_format(publish_run, run_copy, data_dir,
                                                                               tmp_path, learned_run):
    log = tmp_path / "console.log"
    log.write_text("the run's console\n")
    # explore.ipynb writes cam_checks.json into the run (some tests run it on learned_run first);
    # a run without it publishes without it (the notebooks' test checks it copied when there).
    (run_copy / "cam_checks.json").unlink(missing_ok=True)
    said = publish_run["publish"](run_copy, tmp_path / "results", str(data_dir), log=log)
    results = tmp_path / "results"
    assert sorted(p.name for p in results.iterdir()) == sorted(
        ["metrics.csv", "config.json", "run.json", "misclassified.json", "gradcam.npz", "test_predictions.npy",
         "run.log", "epochs-log.txt"])
    assert not list(results.glob("*.pt"))
    assert np.array_equal(np.load(results / "test_predictions.npy"), learned_run.test_predictions)
    assert (results / "run.log").read_text() == "the run's console\n"
    lines = (results / "epochs-log.txt").read_text().splitlines()
    assert lines[0::3] == [f"EPOCH: {r['epoch']}" for r in learned_run.rows]
    right = int((learned_run.test_predictions == _labels(data_dir, learned_run)).sum())
    best = learned_run.rows[learned_run.best_epoch - 1]
    assert lines[3 * learned_run.best_epoch - 1].startswith(f"Test set: Average loss: {best['test_loss']:.4f}, "
                                                            f"Accuracy: {right}/{len(learned_run.test_predictions)} ")
    assert any("as misclassified.json says" in line for line in said)


def _labels(data_dir, learned_run):
    from s11lib.loaders import load_cifar10

    _, labels = load_cifar10(data_dir, train=False)
    return labels[: len(learned_run.test_predictions)].numpy()


def test_predictions_that_miss_misclassified_jsons_accuracy_are_refused_before_anything_is_written(
        publish_run, run_copy, data_dir, tmp_path, learned_run):
    # One right answer made wrong: within load_run's tolerance for a flipped near tie, so only the
    # exact check sees it.
    predictions = np.load(run_copy / "test_predictions.npy")
    right = np.flatnonzero(predictions == _labels(data_dir, learned_run))[0]
    predictions[right] = (predictions[right] + 1) % 10
    np.save(run_copy / "test_predictions.npy", predictions)
    with pytest.raises(publish_run["PublishError"], match=r"scores .*%.* misclassified.json says"):
        publish_run["publish"](run_copy, tmp_path / "results", str(data_dir))
    assert not (tmp_path / "results").exists()


def test_an_unfinished_run_is_refused_in_one_line(publish_run, run_copy, data_dir, tmp_path, capsys, learned_run):
    epochs = len(learned_run.rows)
    write_metrics(read_metrics(run_copy / "metrics.csv")[:-1], run_copy / "metrics.csv")
    assert publish_run["main"]([str(run_copy), str(tmp_path / "results"), "--data-dir", str(data_dir)]) == 1
    error = capsys.readouterr().err
    assert error == f"publish_run: {run_copy} has trained {epochs - 1} of its {epochs} epochs; finish it first\n"
    assert not (tmp_path / "results").exists()


def test_a_run_without_its_pictures_is_refused_before_anything_is_written_when_they_are_asked_for(
        publish_run, run_copy, data_dir, tmp_path):
    (run_copy / "gradcam.png").unlink()
    with pytest.raises(publish_run["PublishError"], match="is not a finished run: no gradcam.png"):
        publish_run["publish"](run_copy, tmp_path / "results", str(data_dir), images=tmp_path / "images")
    assert not (tmp_path / "results").exists() and not (tmp_path / "images").exists()


def test_the_assignment_log_gives_back_the_runs_own_test_line():
    """Epoch 5 of the CPU reference run: the line its log printed (results/cpu-reference-v1/run-log-epochs.txt)."""
    row = dict(epoch=5, lr=0.4, train_loss=1.747051, train_acc=36.7345, test_loss=1.568637, test_acc=42.94,
               seconds=614.159)
    assert assignment_log([row], 10000).splitlines() == [
        "EPOCH: 5", "Train: Average loss: 1.7471, Accuracy: 36.73% (lr 0.4, 614 s)",
        "Test set: Average loss: 1.5686, Accuracy: 4294/10000 (42.94%)"]


def _png(n: int) -> str:
    return base64.b64encode(b"\x89PNG fake %d" % n).decode()


def _executed_explore(pictures_per_cell: dict[str, int]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    count = 0
    for source, shown in pictures_per_cell.items():
        cell = nbformat.v4.new_code_cell(source)
        for _ in range(shown):
            count += 1
            cell.outputs.append(nbformat.v4.new_output("display_data", data={"image/png": _png(count)}))
        nb.cells.append(cell)
    return nb


def test_the_notebooks_pictures_are_found_by_the_cell_that_draws_them(publish_run, tmp_path):
    cells = {"print(1)": 0, "show_figure(plot_reliability(calibrated))": 1,
             "show_figure(neighbour_figure(finished, near))": 1,
             "show_figure(cam_checks.plot_randomization(sanity))\nshow_figure(maps)": 2,
             "show_figure(cam_checks.plot_deletion_insertion(curves))": 1}
    path = tmp_path / "explore.ipynb"
    nbformat.write(_executed_explore(cells), path)
    found = publish_run["notebook_pictures"](path)
    assert found == {"reliability.png": b"\x89PNG fake 1", "neighbours.png": b"\x89PNG fake 2",
                     "cam-sanity.png": b"\x89PNG fake 3", "cam-sanity-maps.png": b"\x89PNG fake 4",
                     "cam-deletion-insertion.png": b"\x89PNG fake 5"}
    cells["show_figure(neighbour_figure(finished, near))"] = 0  # neighbours=False
    nbformat.write(_executed_explore(cells), path)
    with pytest.raises(publish_run["PublishError"], match="neighbour_figure shows 0 pictures, not 1"):
        publish_run["notebook_pictures"](path)


@pytest.mark.slow
def test_the_real_notebooks_give_every_picture_and_train_ipynb_is_stored_with_the_runs_outputs(
        publish_run, run_copy, data_dir, tmp_path, learned_run):
    config_before = json.loads((run_copy / "config.json").read_text())
    notebook = tmp_path / "notebooks" / "train.ipynb"
    notebook.parent.mkdir()
    said = publish_run["publish"](run_copy, tmp_path / "results", str(data_dir), images=tmp_path / "images",
                                  notebook=notebook)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == sorted(["misclassified.png", "gradcam.png", "curves.png", "confusion.png", "reliability.png",
                            "neighbours.png", "cam-sanity.png", "cam-sanity-maps.png", "cam-deletion-insertion.png"])
    assert all((tmp_path / "images" / name).read_bytes().startswith(b"\x89PNG") for name in names)
    assert (run_copy / "explore.ipynb").is_file() and any("explore.ipynb" in line for line in said)
    # The heatmap checks' figures that explore.ipynb wrote go into the results beside the run's files.
    assert (tmp_path / "results" / "cam_checks.json").read_bytes() == (run_copy / "cam_checks.json").read_bytes()

    # train.ipynb ran on the finished run without training it: the same epochs, predictions and settings.
    assert read_metrics(run_copy / "metrics.csv") == read_metrics(learned_run.out_dir / "metrics.csv")
    assert np.array_equal(np.load(tmp_path / "results" / "test_predictions.npy"), learned_run.test_predictions)
    assert json.loads((run_copy / "config.json").read_text()) == {**config_before, "out_dir": str(run_copy.resolve())}
    stored = nbformat.read(notebook, as_version=4)
    nbformat.validate(stored)
    note, *cells = stored.cells
    assert note.metadata["tags"] == [publish_run["STORED_OUTPUTS"]]
    assert note.metadata["s11lib"] == {"results": str((tmp_path / "results").resolve()),
                                       "images": str((tmp_path / "images").resolve())}
    assert "](../results/README.md)" in note.source and f"`out_dir={str(run_copy.resolve())!r}`" in note.source
    assert "`progress=False`" in note.source and "`download=False`" in note.source
    assert not [c for c in cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "papermill" not in stored.metadata and not any("papermill" in c.metadata for c in cells)
    shipped = publish_run["without_stored_outputs"](publish_run["TRAIN_NOTEBOOK"])
    assert [c.source for c in cells] == [c.source for c in shipped.cells]
    (ran,) = [c for c in cells if c.source == "result = run(config)"]
    run_output = "".join(o.get("text", "") for o in ran.outputs)
    assert f"{len(learned_run.rows)} of {len(learned_run.rows)} epochs done" in run_output

    # The check that the stored outputs are the run's can fail: a picture or a row that differs.
    pictures = {n: (tmp_path / "images" / n).read_bytes() for n in publish_run["RUN_PICTURES"]}
    publish_run["check_train_outputs"](stored, pictures, read_metrics(tmp_path / "results" / "metrics.csv"))
    with pytest.raises(publish_run["PublishError"], match="pictures for gradcam.png, not the run's one"):
        publish_run["check_train_outputs"](stored, {**pictures, "gradcam.png": pictures["curves.png"]},
                                           learned_run.rows)
    rows = [dict(r) for r in learned_run.rows]
    rows[-1]["test_acc"] += 1
    with pytest.raises(publish_run["PublishError"], match="epoch table is not metrics.csv's"):
        publish_run["check_train_outputs"](stored, pictures, rows)


def test_the_notebook_is_only_stored_with_the_images_it_shows(publish_run, run_copy, data_dir, tmp_path):
    with pytest.raises(publish_run["PublishError"], match="--notebook needs --images"):
        publish_run["publish"](run_copy, tmp_path / "results", str(data_dir), notebook=tmp_path / "train.ipynb")
    assert not (tmp_path / "results").exists() and not (tmp_path / "train.ipynb").exists()
