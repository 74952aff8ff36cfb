"""environment.yml and pyproject.toml name the same packages."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_the_pyproject_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra}
    conda = set()
    text = (ROOT / "environment.yml").read_text()
    for line in text[text.index("\ndependencies:"):].splitlines():
        m = re.match(r"^  - ([A-Za-z][\w.-]*)", line)  # top-level conda dependencies only
        if m and m.group(1) not in ("python", "pip"):
            conda.add(CONDA_NAMES.get(_name(m.group(1)), _name(m.group(1))))
    assert conda == wanted
    assert {"torch", "torchvision", "jupyter", "ipywidgets", "papermill", "nbval", "matplotlib", "numpy"} <= wanted


def test_ipywidgets_7_is_allowed_for_colab():
    # Colab ships ipywidgets 7 and its support for 8 has been incomplete (googlecolab/colabtools
    # #3020, #4525); the notebooks' Colab cell installs s11lib with --no-deps, and a pin to 8 would
    # make every other pip install there replace Colab's widgets. The browser uses only widgets 7.6 has.
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (widgets,) = [Requirement(r) for r in project["dependencies"] if _name(r) == "ipywidgets"]
    assert widgets.specifier.contains("7.7.1") and widgets.specifier.contains("8.1.5")
    conda = [line.strip()[2:] for line in (ROOT / "environment.yml").read_text().splitlines()
             if line.strip().startswith("- ipywidgets")]
    assert [str(Requirement(c).specifier) for c in conda] == [str(widgets.specifier)]


def test_the_torch_floor_holds_for_every_shipped_option():
    # compile=True with fused SGD on CUDA fails before torch 2.5 (PR #134546; pytorch#126585): the
    # floor must exclude 2.4, in pyproject and in environment.yml alike.
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch_req,) = [Requirement(r) for r in project["dependencies"] if _name(r) == "torch"]
    assert not torch_req.specifier.contains("2.4.1") and torch_req.specifier.contains("2.5.0")
    conda = [line.strip()[2:] for line in (ROOT / "environment.yml").read_text().splitlines()
             if line.strip().startswith("- pytorch")]
    assert [str(Requirement(c.replace("pytorch", "torch")).specifier) for c in conda] == [str(torch_req.specifier)]
