"""Put a finished run into the repository: its small files into a results folder, checked, and
(with --images) the README's pictures of it into images/, (with --notebook) train.ipynb with its outputs.

    .venv/bin/python scripts/publish_run.py runs/reference/run results/cpu-reference \
        --data-dir ../shared/datasets/cifar10 --log runs/reference/run.log --images images \
        --notebook notebooks/train.ipynb

It refuses a run that has not finished (metrics.csv short of config.json's epochs, or a file of
the run's explanation missing), and checks before it copies anything:
* best.pt predicts the test set as test_predictions.npy says (`explore.load_run`, which re-predicts);
* test_predictions.npy scored against the test labels gives misclassified.json's accuracy, exactly;
* every image in misclassified.json is one that test_predictions.npy gets wrong, as it says.

Into RESULTS it copies metrics.csv, config.json, run.json (when the run has one),
misclassified.json, gradcam.npz, test_predictions.npy, cam_checks.json (the heatmap checks'
figures, when explore.ipynb has written them) and the log, and writes `epochs-log.txt`:
metrics.csv in the assignment's per-epoch format (`s11lib.utils.summary.assignment_log`). No
checkpoints. With --images it copies the run's own four pictures and executes
notebooks/explore.ipynb on the run with papermill (into the run folder, as explore.ipynb), saving
its pictures of the calibration, the neighbours and the heatmap checks.

With --notebook (and --images) it first executes notebooks/train.ipynb on the finished run, with
the run's own parameters (it resumes at its last epoch and only explains: best.pt's predictions,
mistakes, Grad-CAM and figures, written again into the run folder, as the notebook shows them),
and checks that the pictures it shows are the run's files and its epoch table is metrics.csv's.
The notebook is stored without papermill's injected-parameters cell (Colab would run it, with this
machine's paths) and its timing metadata, and starts with a markdown cell tagged `stored-outputs`
that says which run and which parameters its outputs come from (`STORED_OUTPUTS`;
tests/test_notebook.py checks a stored train.ipynb against the results and images it names).

Each file is written atomically; a failed check writes nothing.
"""
from __future__ import annotations

import argparse
import ast
import base64
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from s11lib.config import Config
from s11lib.explore import load_run
from s11lib.provenance import cpu_name
from s11lib.run import read_metrics
from s11lib.utils import atomic
from s11lib.utils.summary import assignment_log, epoch_table

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = ("metrics.csv", "config.json", "misclassified.json", "gradcam.npz", "test_predictions.npy")
OPTIONAL_FILES = ("run.json", "cam_checks.json")  # cam_checks.json: explore.ipynb's, with --images
RUN_PICTURES = ("misclassified.png", "gradcam.png", "curves.png", "confusion.png")
# explore.ipynb's pictures: the code cell that calls the first, and the names of the PNGs it shows, in order.
NOTEBOOK_PICTURES = (("plot_reliability(", ("reliability.png",)),
                     ("neighbour_figure(finished", ("neighbours.png",)),
                     ("plot_randomization(sanity)", ("cam-sanity.png", "cam-sanity-maps.png")),
                     ("plot_deletion_insertion(", ("cam-deletion-insertion.png",)))
TRAIN_NOTEBOOK = ROOT / "notebooks" / "train.ipynb"
# The tag of the markdown cell a train.ipynb stored with outputs starts with; its metadata["s11lib"]
# names the results and images folders (relative to the repository) the outputs must match.
STORED_OUTPUTS = "stored-outputs"


class PublishError(Exception):
    """A run that cannot be published as it is: the message says why, in one line."""


def check_finished(run_dir: Path, pictures: bool = False) -> Config:
    needed = RESULT_FILES + ("best.pt",) + (RUN_PICTURES if pictures else ())
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise PublishError(f"{run_dir} is not a finished run: no {', '.join(missing)}")
    config = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    epochs = len(read_metrics(run_dir / "metrics.csv"))
    if epochs != config.epochs:
        raise PublishError(f"{run_dir} has trained {epochs} of its {config.epochs} epochs; finish it first")
    return config


def check_predictions(run_dir: Path, labels: np.ndarray) -> str:
    """The checks the module's docstring lists on the stored files, against the test labels the
    run used (`load_run`'s); returns what they found."""
    predictions = np.load(run_dir / "test_predictions.npy")
    if len(predictions) != len(labels):
        raise PublishError(f"{len(predictions)} test predictions for {len(labels)} test images")
    told = json.loads((run_dir / "misclassified.json").read_text())
    correct = int((predictions == labels).sum())
    accuracy = round(100 * correct / len(labels), 4)
    if told["test_images"] != len(labels) or told["test_accuracy"] != accuracy:
        raise PublishError(f"test_predictions.npy scores {accuracy}% on {len(labels)} images, misclassified.json "
                           f"says {told['test_accuracy']}% on {told['test_images']}")
    for mistake in told["misclassified"]:
        i = mistake["index"]
        if not (labels[i] == mistake["label"] != mistake["pred"] == predictions[i]):
            raise PublishError(f"misclassified.json's test image {i} ({mistake['label']} taken for "
                               f"{mistake['pred']}) is not such a mistake in test_predictions.npy")
    return (f"test_predictions.npy: {correct}/{len(labels)} right ({accuracy:.2f}%), as misclassified.json says; "
            f"its {len(told['misclassified'])} mistakes agree")


def copy_atomically(source: Path, target: Path) -> None:
    with atomic.atomic_open(target, "wb") as f, open(source, "rb") as g:
        shutil.copyfileobj(g, f)


def notebook_pictures(notebook: Path) -> dict[str, bytes]:
    """The PNGs of an executed explore.ipynb, by NOTEBOOK_PICTURES' names."""
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    found = {}
    for marker, names in NOTEBOOK_PICTURES:
        call = marker.split("(")[0]
        cell = next((c for c in cells if marker in "".join(c["source"])), None)
        if cell is None:
            raise PublishError(f"{notebook} has no cell that calls {call}")
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        if len(pngs) != len(names):
            raise PublishError(f"{notebook}: the cell that calls {call} shows {len(pngs)} pictures, "
                               f"not {len(names)} ({', '.join(names)})")
        found.update(zip(names, (base64.b64decode(p) for p in pngs)))
    return found


def run_explore(run_dir: Path, data_dir: str, device: str) -> Path:
    import papermill as pm  # only here: the checks and the copies need no notebook machinery

    executed = run_dir / "explore.ipynb"
    print(f"executing notebooks/explore.ipynb on {run_dir} (a full-width run's features of its training "
          "images take minutes on a CPU); a bar per cell:", flush=True)
    pm.execute_notebook(str(ROOT / "notebooks" / "explore.ipynb"), str(executed), progress_bar=True,
                        parameters=dict(run_dir=str(run_dir), data_dir=data_dir, device=device))
    return executed


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def without_stored_outputs(path: Path):
    """The notebook at `path` as shipped, when it is a train.ipynb stored with outputs: the note cell
    dropped, every output and execution count cleared (for papermill to run it afresh, or to compare
    its source). An nbformat node: its sources and stream texts are strings."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if STORED_OUTPUTS not in _tags(c)]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def notebook_defaults(nb) -> dict:
    """The values a notebook's `parameters` cell assigns (literals only, as tests/test_notebook.py requires)."""
    (cell,) = [c for c in nb.cells if "parameters" in _tags(c)]
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


def run_train_notebook(run_dir: Path, config: Config, data_dir: str, device: str) -> tuple[Path, dict]:
    """Execute the shipped train.ipynb on the finished run, into run_dir/train.ipynb; returns that
    path and the parameters that differ from the notebook's defaults."""
    import nbformat
    import papermill as pm

    shipped = without_stored_outputs(TRAIN_NOTEBOOK)
    # Absolute paths: config.json is written again from these, and must stay the run's.
    parameters = {**config.to_dict(), "out_dir": str(run_dir.resolve()), "data_dir": str(Path(data_dir).resolve()),
                  "download": False, "device": device, "progress": False}
    defaults = notebook_defaults(shipped)
    changed = {k: v for k, v in parameters.items() if defaults.get(k) != v}
    executed = run_dir / "train.ipynb"
    print(f"executing notebooks/train.ipynb on {run_dir} (it resumes at epoch {config.epochs} of "
          f"{config.epochs} and explains the run again); a bar per cell:", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "train.ipynb"
        nbformat.write(shipped, source)
        try:
            pm.execute_notebook(str(source), str(executed), parameters=changed, progress_bar=True,
                                cwd=str(ROOT))
        except pm.PapermillExecutionError as error:
            raise PublishError(f"notebooks/train.ipynb failed on {run_dir} ({error.ename}: {error.evalue}); "
                               f"the executed notebook: {executed}") from None
    return executed, changed


def stored_train_notebook(executed: Path, changed: dict, results: Path, images: Path, notebook: Path):
    """The executed train.ipynb as the repository keeps it: no injected-parameters cell, no
    papermill or timing metadata, and first the note that says where its outputs come from."""
    import nbformat
    import torch

    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in _tags(c)]
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    link = os.path.relpath(results / "README.md", notebook.resolve().parent).replace(os.sep, "/")
    settings = ", ".join(f"`{k}={v!r}`" for k, v in changed.items())
    # Worded to stay true in a copy that someone executes (papermill, Colab): it keeps this cell.
    note = nbformat.v4.new_markdown_cell(
        f"**The outputs in the repository's copy of this notebook come from the finished run in "
        f"[{results.name}]({link})**: `scripts/publish_run.py` executed the notebook once on that run (it "
        f"resumes at its last epoch and only explains it) on {datetime.date.today().isoformat()}, on "
        f"{cpu_name()}, torch {torch.__version__}, with {settings} and every other parameter at its default "
        "below. When you run the notebook, your run's outputs replace them.")
    note.metadata["tags"] = [STORED_OUTPUTS]
    note.metadata["s11lib"] = {"results": _in_repository(results), "images": _in_repository(images)}
    nb.cells.insert(0, note)
    return nb


def _in_repository(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path.resolve())


def check_train_outputs(nb, pictures: dict[str, bytes], rows: list[dict]) -> None:
    """An executed train.ipynb (an nbformat node) shows `pictures` (by file name: each shown once,
    byte for byte, by the cell that displays that file) and prints metrics.csv's `rows` as its epoch
    table."""
    cells = [c for c in nb.cells if c.cell_type == "code"]

    def outputs(marker: str) -> list:
        cell = next((c for c in cells if marker in c.source), None)
        if cell is None:
            raise PublishError(f"train.ipynb has no cell with {marker}")
        return cell.get("outputs", [])

    for name, png in pictures.items():
        shown = [o["data"]["image/png"] for o in outputs(f'"{name}"') if "image/png" in o.get("data", {})]
        if [base64.b64decode(p) for p in shown] != [png]:
            raise PublishError(f"train.ipynb shows {len(shown)} pictures for {name}, not the run's one")
    printed = "".join(o.text for o in outputs("epoch_table(") if o.output_type == "stream" and o.name == "stdout")
    if epoch_table(rows) not in printed:
        raise PublishError("train.ipynb's epoch table is not metrics.csv's")


def publish(run_dir: Path, results: Path, data_dir: str, log: Path | None = None, images: Path | None = None,
            device: str = "cpu", say=print, notebook: Path | None = None) -> list[str]:
    """Check the run, then copy and write; says a line per thing done as it is done, and returns them."""
    said = []

    def done(line: str) -> None:
        said.append(line)
        say(line)

    if notebook is not None and images is None:
        raise PublishError("--notebook needs --images: the pictures it shows must be the ones images/ holds")
    config = check_finished(run_dir, pictures=images is not None)
    data_dir = str(data_dir or config.data_dir)
    if log is not None and not log.is_file():
        raise PublishError(f"--log {log}: no such file")
    executed = changed = None
    if notebook is not None:  # first: it writes the run's explanation again, which the checks then read
        executed, changed = run_train_notebook(run_dir, config, data_dir, device)
        done(f"executed notebooks/train.ipynb into {executed}")
    finished = load_run(run_dir, data_dir, device)  # best.pt re-predicts the test set; raises if it disagrees
    done(f"best.pt agrees with test_predictions.npy ({run_dir})")
    done(check_predictions(run_dir, finished.labels.numpy()))
    stored = None
    if notebook is not None:
        stored = stored_train_notebook(executed, changed, results, images, notebook)
        check_train_outputs(stored, {name: (run_dir / name).read_bytes() for name in RUN_PICTURES}, finished.rows)
        done("train.ipynb shows the run's four pictures and metrics.csv's epoch table")
    pictures = {}
    if images is not None:
        pictures = notebook_pictures(run_explore(run_dir, data_dir, device))
        done(f"executed notebooks/explore.ipynb into {run_dir / 'explore.ipynb'}")
    results.mkdir(parents=True, exist_ok=True)
    names = list(RESULT_FILES) + [name for name in OPTIONAL_FILES if (run_dir / name).is_file()]
    for name in names:
        copy_atomically(run_dir / name, results / name)
    if log is not None:
        copy_atomically(log, results / "run.log")
        names.append("run.log")
    with atomic.atomic_open(results / "epochs-log.txt", "w") as f:
        f.write(assignment_log(finished.rows, len(finished.labels)) + "\n")
    done(f"wrote {', '.join(names + ['epochs-log.txt'])} to {results}")
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        for name in RUN_PICTURES:
            copy_atomically(run_dir / name, images / name)
        for name, png in pictures.items():
            with atomic.atomic_open(images / name, "wb") as f:
                f.write(png)
        done(f"wrote {', '.join(list(RUN_PICTURES) + list(pictures))} to {images}")
    if stored is not None:
        import nbformat

        with atomic.atomic_open(notebook, "w") as f:
            f.write(nbformat.writes(stored) + "\n")
        done(f"wrote {notebook}, with its outputs")
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the finished run's out_dir")
    parser.add_argument("results", type=Path, help="the folder to copy its small files into")
    parser.add_argument("--data-dir", default=None, help="where CIFAR-10 is; default the run's own data_dir")
    parser.add_argument("--log", type=Path, default=None, help="the run's console log, copied as run.log")
    parser.add_argument("--images", type=Path, default=None, help="also save the run's pictures into this folder")
    parser.add_argument("--notebook", type=Path, default=None,
                        help="also execute train.ipynb on the run and store it, with its outputs, here (needs --images)")
    parser.add_argument("--device", default="cpu", help="for best.pt's predictions and the notebooks")
    args = parser.parse_args(argv)
    try:
        publish(args.run_dir, args.results, args.data_dir, args.log, args.images, args.device,
                notebook=args.notebook)
    except (PublishError, ValueError) as error:
        print(f"publish_run: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
