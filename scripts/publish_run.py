"""Put a finished run into the repository: its small files into a results folder, checked, and
(with --images) the README's pictures of it into images/.

    .venv/bin/python scripts/publish_run.py ~/s11-reference/run results/cpu-reference \
        --data-dir ../shared/datasets/cifar10 --log ~/s11-reference/run.log --images images

It refuses a run that has not finished (metrics.csv short of config.json's epochs, or a file of
the run's explanation missing), and checks before it copies anything:
* best.pt predicts the test set as test_predictions.npy says (`explore.load_run`, which re-predicts);
* test_predictions.npy scored against the test labels gives misclassified.json's accuracy, exactly;
* every image in misclassified.json is one that test_predictions.npy gets wrong, as it says.

Into RESULTS it copies metrics.csv, config.json, run.json (when the run has one),
misclassified.json, gradcam.npz, test_predictions.npy and the log, and writes `epochs-log.txt`:
metrics.csv in the assignment's per-epoch format (`s11lib.utils.summary.assignment_log`). No
checkpoints. With --images it copies the run's own four pictures and executes
notebooks/explore.ipynb on the run with papermill (into the run folder, as explore.ipynb), saving
its pictures of the calibration, the neighbours and the heatmap checks. Each file is written
atomically; a failed check writes nothing.
"""
from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from s11lib.config import Config
from s11lib.explore import load_run
from s11lib.run import read_metrics
from s11lib.utils import atomic
from s11lib.utils.summary import assignment_log

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = ("metrics.csv", "config.json", "misclassified.json", "gradcam.npz", "test_predictions.npy")
OPTIONAL_FILES = ("run.json",)
RUN_PICTURES = ("misclassified.png", "gradcam.png", "curves.png", "confusion.png")
# explore.ipynb's pictures: the code cell that calls the first, and the names of the PNGs it shows, in order.
NOTEBOOK_PICTURES = (("plot_reliability(", ("reliability.png",)),
                     ("neighbour_figure(finished", ("neighbours.png",)),
                     ("plot_randomization(sanity)", ("cam-sanity.png", "cam-sanity-maps.png")),
                     ("plot_deletion_insertion(", ("cam-deletion-insertion.png",)))


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


def publish(run_dir: Path, results: Path, data_dir: str, log: Path | None = None, images: Path | None = None,
            device: str = "cpu", say=print) -> list[str]:
    """Check the run, then copy and write; says a line per thing done as it is done, and returns them."""
    said = []

    def done(line: str) -> None:
        said.append(line)
        say(line)

    config = check_finished(run_dir, pictures=images is not None)
    data_dir = str(data_dir or config.data_dir)
    if log is not None and not log.is_file():
        raise PublishError(f"--log {log}: no such file")
    finished = load_run(run_dir, data_dir, device)  # best.pt re-predicts the test set; raises if it disagrees
    done(f"best.pt agrees with test_predictions.npy ({run_dir})")
    done(check_predictions(run_dir, finished.labels.numpy()))
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
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the finished run's out_dir")
    parser.add_argument("results", type=Path, help="the folder to copy its small files into")
    parser.add_argument("--data-dir", default=None, help="where CIFAR-10 is; default the run's own data_dir")
    parser.add_argument("--log", type=Path, default=None, help="the run's console log, copied as run.log")
    parser.add_argument("--images", type=Path, default=None, help="also save the run's pictures into this folder")
    parser.add_argument("--device", default="cpu", help="for best.pt's predictions and explore.ipynb")
    args = parser.parse_args(argv)
    try:
        publish(args.run_dir, args.results, args.data_dir, args.log, args.images, args.device)
    except (PublishError, ValueError) as error:
        print(f"publish_run: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
