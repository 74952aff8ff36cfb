"""Re-make the nbval references: notebooks/*.ipynb executed with small parameters on the real data.

    S11_CIFAR10_DIR=../shared/datasets/cifar10 .venv/bin/python tests/refresh_notebooks.py

Run it after changing a notebook (tests/test_notebook.py fails until you do), then look at the
diff of tests/notebooks/*.ipynb before committing it: that diff is the change in what users see.

Each reference is its notebook with one extra cell after `parameters` (tagged
`injected-parameters`, as papermill tags its own) that sets REGRESSION's values. The data and
run folders come from the environment, so the same files run on any machine: the suite's conftest
sets S11_NBVAL_RUN_DIR to a fresh folder and makes S11_CIFAR10_DIR absolute. explore.ipynb reads
the run that train.ipynb writes, so train runs first, here and in the suite. compare.ipynb reads
a sweep of tiny runs (SWEEP_GRID) in S11_NBVAL_SWEEP_DIR, made here first.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
import papermill as pm

from s11lib import sweep

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "tests" / "notebooks"
# Small enough for 2 CPU cores (the three, with the sweep, take under a minute), real enough to show
# every output.
REGRESSION = {
    "train": dict(download=False, epochs=2, batch_size=32, train_subset=96, val_size=32, test_subset=100, width=8,
                  device="cpu", resume=False, num_misclassified=10),  # otherwise the shipped recipe
    "explore": dict(device="cpu", static_mistakes=3),
    "compare": dict(),
}
FROM_ENVIRONMENT = {
    "train": {"data_dir": "S11_CIFAR10_DIR", "out_dir": "S11_NBVAL_RUN_DIR"},
    "explore": {"data_dir": "S11_CIFAR10_DIR", "run_dir": "S11_NBVAL_RUN_DIR"},
    "compare": {"data_dir": "S11_CIFAR10_DIR", "sweep_dir": "S11_NBVAL_SWEEP_DIR"},
}
# The sweep compare.ipynb reads: 2 learning rates x 2 seeds of tiny runs (about 8 s each). The suite
# makes it through a kill, a failure and a resume (tests/conftest.py, sweep_scenario); made here
# without them, it must come out the same. SGD, whose rates (per 512 images) these are.
SWEEP_PARAMETERS = dict(download=False, epochs=4, batch_size=32, train_subset=96, val_size=32, test_subset=100,
                        width=8, device="cpu", num_misclassified=5, warmup_epochs=0, optimizer="sgd")
SWEEP_GRID = {"lr": [0.1, 0.8], "seed": [1, 2]}


def write_sweep_spec(path: Path, sweep_dir: Path, data_dir: str) -> Path:
    """The regression sweep's spec, as YAML at `path`."""
    import yaml

    spec = {"out_dir": str(sweep_dir), "parameters": {"data_dir": data_dir, **SWEEP_PARAMETERS}, "grid": SWEEP_GRID}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def parameters_cell(name: str) -> nbformat.NotebookNode:
    lines = ["# The nbval regression run's parameters (written by tests/refresh_notebooks.py)", "import os", ""]
    lines += [f"{key} = os.environ[{variable!r}]" for key, variable in FROM_ENVIRONMENT[name].items()]
    lines += [f"{key} = {value!r}" for key, value in REGRESSION[name].items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    return cell


def shipped(name: str) -> nbformat.NotebookNode:
    """notebooks/NAME.ipynb as shipped: train.ipynb stored with a published run's outputs
    (scripts/publish_run.py) without them and without the note on where they come from."""
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "publish_run.py"))["without_stored_outputs"](
        ROOT / "notebooks" / f"{name}.ipynb")


def with_parameters(name: str) -> nbformat.NotebookNode:
    nb = shipped(name)
    position = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(position + 1, parameters_cell(name))
    return nb


def without_pictures(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop the PNGs: nbval does not compare them (their pixels depend on the matplotlib and
    FreeType builds), and they would make each reference a megabyte. The text beside each
    picture stays, so the output is still there to be compared."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            output.get("data", {}).pop("image/png", None)
    return nb


def main() -> int:
    if not os.environ.get("S11_CIFAR10_DIR"):
        print("set S11_CIFAR10_DIR to the folder that holds cifar-10-batches-py/ (the real CIFAR-10)", file=sys.stderr)
        return 2
    os.environ["S11_CIFAR10_DIR"] = str(Path(os.environ["S11_CIFAR10_DIR"]).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["S11_NBVAL_RUN_DIR"] = str(Path(tmp) / "s11-nbval-run")
        os.environ["S11_NBVAL_SWEEP_DIR"] = str(Path(tmp) / "s11-nbval-sweep")
        spec = write_sweep_spec(Path(tmp) / "sweep.yaml", Path(os.environ["S11_NBVAL_SWEEP_DIR"]),
                                os.environ["S11_CIFAR10_DIR"])
        if sweep.main([str(spec)]) != 0:
            print("the regression sweep failed: see the lines above, and the logs they name", file=sys.stderr)
            return 1
        for name in ("train", "explore", "compare"):
            source = Path(tmp) / f"{name}.ipynb"
            nbformat.write(with_parameters(name), source)
            target = REFERENCES / f"{name}.ipynb"
            pm.execute_notebook(str(source), str(target), kernel_name="python3", cwd=str(REFERENCES),
                                progress_bar=False)
            nbformat.write(without_pictures(nbformat.read(target, as_version=4)), target)
            print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
