"""Sweeps (s11lib/sweep.py) and their comparison (s11lib/compare.py, notebooks/compare.ipynb).

The end-to-end tests read one tiny sweep (2 learning rates x 2 seeds) that tests/conftest.py's
sweep_scenario runs three times: stopped by SIGTERM with one run's folder taken by a file, again
on two faked GPUs, and once more with the file gone. compare.ipynb's nbval reference reads the
same folder.
"""
import dataclasses
import json
import math
import re

from pathlib import Path

import nbformat
import numpy as np
import papermill as pm
import pytest
import torch

from conftest import fake_cuda
from s11lib import compare, provenance, sweep
from s11lib.compare import Sweep, SweptRun
from s11lib.config import Config
from s11lib.run import read_metrics
from s11lib.utils import atomic

ROOT = Path(__file__).parents[1]


# --- the spec ----------------------------------------------------------------------------------------
GOOD = "out_dir: {out}\nparameters: {{epochs: 2}}\ngrid: {{lr: [0.4, 0.8], seed: [1, 2]}}\n"
BAD_SPECS = {
    "a typo in the grid": ("out_dir: {out}\ngrid: {{seeds: [1, 2]}}", "unknown parameter 'seeds' (did you mean 'seed'?)"),
    "a typo in parameters": ("out_dir: {out}\nparameters: {{epoch: 2}}\ngrid: {{seed: [1]}}",
                             "unknown parameter 'epoch' (did you mean 'epochs'?)"),
    "an empty grid": ("out_dir: {out}\ngrid: {{}}", "the grid is empty"),
    "no grid": ("out_dir: {out}\nparameters: {{epochs: 2}}", "the grid is empty"),
    "an empty list": ("out_dir: {out}\ngrid: {{seed: []}}", "grid.seed must be a non-empty list"),
    "a value that is no list": ("out_dir: {out}\ngrid: {{seed: 1}}", "grid.seed must be a non-empty list"),
    "an unknown key": ("out_dir: {out}\nparamters: {{epochs: 2}}\ngrid: {{seed: [1]}}",
                       "unknown key 'paramters' (did you mean 'parameters'?)"),
    "no out_dir": ("grid: {{seed: [1]}}", "out_dir must name the sweep's folder"),
    "out_dir among the parameters": ("out_dir: {out}\nparameters: {{out_dir: x}}\ngrid: {{seed: [1]}}",
                                     "each run's out_dir is the sweep's out_dir/NAME"),
    "a value a run refuses": ("out_dir: {out}\ngrid: {{lr: [0.1, -1]}}", "run lr=-1: lr must be above 0"),
    "YAML's text 1e-3": ("out_dir: {out}\ngrid: {{lr: [1e-3]}}", "YAML reads 1e-3 as text: write 0.001"),
    "a value twice": ("out_dir: {out}\ngrid: {{seed: [1, 1]}}", "two runs of the grid would share the folder 'seed=1'"),
    "a name in both": ("out_dir: {out}\nparameters: {{seed: 1}}\ngrid: {{seed: [1, 2]}}",
                       "seed is both in parameters and in the grid"),
    "broken YAML": ("out_dir: {out}\ngrid: {{seed: [1, 2}}", "is not valid YAML at line 2"),
    "a list at the top": ("- {out}", "must be a mapping with the keys out_dir, parameters, grid"),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_a_bad_spec_is_one_line_before_anything_runs(case, tmp_path, capsys):
    text, expected = BAD_SPECS[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.format(out=tmp_path / "sweep"))
    assert sweep.main([str(spec)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "sweep").exists()


def test_other_refusals_are_one_line_too(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD.format(out=tmp_path / "sweep"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for argv, expected in (([str(tmp_path / "missing.yaml")], "cannot read the sweep spec"),
                           ([str(spec), "--gpus", "0"], "--gpus: this machine has no CUDA GPU")):
        assert sweep.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    with pytest.raises(SystemExit) as stopped:  # argparse's own errors, made one line
        sweep.main([str(spec), "--gpu", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("error: unrecognized arguments: --gpu 0; `python -m s11lib.sweep --help` "
                                       "lists the options\n")
    assert not (tmp_path / "sweep").exists()
    (tmp_path / "sweep").write_text("a file")
    assert sweep.main([str(spec)]) == 2
    assert capsys.readouterr().err == f"error: out_dir {tmp_path / 'sweep'} is a file, not a folder\n"


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD.format(out=tmp_path / "sweep"))
    (tmp_path / "sweep").mkdir()
    with atomic.exclusive(tmp_path / "sweep"):
        assert sweep.main([str(spec)]) == 2
    assert capsys.readouterr().err == (f"error: another sweep is running in {tmp_path / 'sweep'}; "
                                         "wait for it or use another out_dir\n")
    assert list((tmp_path / "sweep").iterdir()) == []


def test_the_documented_specs_and_their_errors(tmp_path, capsys, monkeypatch):
    readme = (ROOT / "docs" / "sweeps.md").read_text()
    spec = tmp_path / "warmup.yaml"
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert len(blocks) == 2 and blocks[0].startswith("# warmup.yaml") and blocks[1].startswith("# cpu-warmup.yaml")
    for block in blocks:
        spec.write_text(block)
        assert [p.name for p in sweep.read_spec(spec).points] == [
            f"warmup_epochs={w},seed={s}" for w in (0, 2) for s in (1, 2, 3)]
    spec.write_text(blocks[0])
    assert "bash scripts/sweep.sh warmup.yaml --gpus all" in readme and (ROOT / "scripts" / "sweep.sh").is_file()
    # The page's two examples of a refused spec are what the sweep prints (up to the "...").
    monkeypatch.chdir(tmp_path)
    text = spec.read_text()
    for edited in (text.replace("seed:", "seeds:"), text.replace("[0, 2]", "[-1, 2]")):
        spec.write_text(edited)
        assert sweep.main(["warmup.yaml"]) == 2
        printed = capsys.readouterr().err.strip()
        shown = re.search(re.escape(printed[:40]) + r"[^`]*", readme.replace("\n  ", " "))
        assert shown and printed.startswith(shown[0].removesuffix("..."))


def test_points_are_the_grid_in_order_with_readable_names(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"out_dir: {tmp_path}/s\nparameters: {{epochs: 2}}\n"
                    "grid: {lr: [0.4, 1.0e-3], device: ['cpu', 'cuda:1'], seed: [1, 2]}\n")
    points = sweep.read_spec(spec).points
    assert [p.name for p in points[:4]] == ["lr=0.4,device=cpu,seed=1", "lr=0.4,device=cpu,seed=2",
                                             "lr=0.4,device=cuda_1,seed=1", "lr=0.4,device=cuda_1,seed=2"]
    assert points[4].name == "lr=0.001,device=cpu,seed=1" and len(points) == 8
    assert [p.index for p in points] == list(range(1, 9))
    assert points[2].parameters == {"epochs": 2, "lr": 0.4, "device": "cuda:1", "seed": 1,
                                    "out_dir": f"{tmp_path}/s/lr=0.4,device=cuda_1,seed=1"}


def test_gpus_name_the_cuda_devices_each_run_sees(monkeypatch):
    fake_cuda(monkeypatch, 2, (8, 0), ["sm_80"], "NVIDIA A100 (faked)")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sweep.parse_gpus("all") == ["0", "1"] and sweep.parse_gpus("1") == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # torch's 0 and 1 are the machine's 3 and 5
    assert sweep.parse_gpus("all") == ["3", "5"] and sweep.parse_gpus("1,0") == ["5", "3"]
    for bad in ("2", "0,0", "one"):
        with pytest.raises(ValueError, match="--gpus"):
            sweep.parse_gpus(bad)


# --- a sweep that is stopped, fails and is continued --------------------------------------------------
def _run_line(output: str, name: str, what: str) -> int:
    """The index of the first printed line about run `name` that contains `what`."""
    lines = output.splitlines()
    return next(i for i, line in enumerate(lines) if f"] {name}: " in line and what in line)


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_a_stopped_sweep_stops_its_run_and_keeps_what_it_has(swept):
    first = swept.first
    assert first.code == 130, first.output
    names = list(first.statuses)
    assert first.statuses == {names[0]: "done", swept.blocked: "failed", swept.killed: "interrupted",
                              names[3]: "pending"}
    assert "interrupted; the same command continues the sweep" in first.output
    assert swept.lock_free_after_first  # the stopped run's kernel is gone, not training on unseen
    assert "last.pt" in swept.killed_files_after_first and sweep.FINISHED not in swept.killed_files_after_first


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_a_failing_run_is_reported_and_the_others_go_on(swept):
    for call in (swept.first, swept.second):
        line = call.output.splitlines()[_run_line(call.output, swept.blocked, "FAILED")]
        assert "FAILED (exit 2)" in line and f"out_dir {swept.folder / swept.blocked} is a file, not a folder" in line
        assert f"log: {swept.folder / 'logs' / swept.blocked}.log" in line
    second = swept.second
    assert second.code == 1, second.output  # every other run done, yet the status says one failed
    assert second.output.rstrip().splitlines()[-1] == (f"sweep: 3 of 4 runs done, 1 failed ({swept.blocked}); "
                                                         f"summary: {swept.folder / 'summary.csv'}")
    assert list(second.statuses.values()) == ["done", "failed", "done", "done"]
    error = {row["run"]: row["error"] for row in second.summary}
    assert error[swept.blocked] == f"out_dir {swept.folder / swept.blocked} is a file, not a folder"


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_the_same_spec_again_skips_finished_runs_and_continues_the_stopped_one(swept):
    first_run = next(iter(swept.first.statuses))
    for call in (swept.second, swept.third):
        assert f"] {first_run}: finished before; skipped" in call.output
    assert swept.notebook_time_after_third == swept.notebook_time_after_first  # its notebook never ran again
    assert not (swept.folder / first_run / "train.1.ipynb").exists()
    log = (swept.folder / "logs" / f"{swept.killed}.log").read_text()
    attempts = log.split("=== ")[1:]
    assert "interrupted" in attempts[1] and "exit status 0" in attempts[-1]
    assert re.search(rf"resuming from {re.escape(str(swept.folder / swept.killed / 'last.pt'))}: [1-3] of 4 epochs done",
                     attempts[2]), attempts[2][-2000:]
    # The notebook of the stopped attempt is kept beside the one that finished (s11lib/notebook.py).
    assert (swept.folder / swept.killed / "train.1.ipynb").is_file()
    third = swept.third
    assert third.code == 0, third.output
    assert [line for line in third.output.splitlines() if "started" in line] == [
        f"[2/4] {swept.blocked}: started; log: {swept.folder / 'logs' / swept.blocked}.log"]
    assert set(third.statuses.values()) == {"done"}


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_runs_go_one_per_gpu_side_by_side(swept):
    output, names = swept.second.output, list(swept.second.statuses)
    # The second run fails at once on GPU 0, whose next run starts while the third still trains on GPU 1.
    assert f"] {swept.blocked}: started on GPU 0" in output and f"] {swept.killed}: started on GPU 1" in output
    assert f"] {names[3]}: started on GPU 0" in output
    assert _run_line(output, names[3], "started") < _run_line(output, swept.killed, "done in")
    for name, gpu in ((swept.killed, "1"), (names[3], "0")):
        log = (swept.folder / "logs" / f"{name}.log").read_text()
        assert f"started on CUDA_VISIBLE_DEVICES={gpu}" in log


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_summary_has_a_row_per_run_from_its_files(swept):
    header = (swept.folder / "summary.csv").read_text().splitlines()[0]
    assert header == ("run,status,lr,seed,epochs_done,final_val_acc,final_test_acc,best_epoch,best_val_acc,"
                      "best_test_acc,seconds,commit,device,error")
    rows = sweep.read_summary(swept.folder / "summary.csv")
    assert [(r["lr"], r["seed"]) for r in rows] == [(0.1, 1), (0.1, 2), (0.8, 1), (0.8, 2)]
    for row in rows:
        run_dir = swept.folder / row["run"]
        metrics = read_metrics(run_dir / "metrics.csv")
        explained = json.loads((run_dir / "misclassified.json").read_text())
        assert row["status"] == "done" and row["error"] == "" and row["epochs_done"] == 4
        assert (row["final_val_acc"], row["final_test_acc"]) == (metrics[-1]["val_acc"], metrics[-1]["test_acc"])
        assert row["best_epoch"] == explained["epoch"] and row["best_test_acc"] == explained["test_accuracy"]
        assert row["best_val_acc"] == metrics[row["best_epoch"] - 1]["val_acc"] == max(r["val_acc"] for r in metrics)
        assert row["seconds"] == pytest.approx(sum(r["seconds"] for r in metrics), abs=0.051)
        assert json.loads((run_dir / sweep.FINISHED).read_text())["parameters"]["out_dir"] == str(run_dir)
        made = provenance.read(run_dir)  # every segment's commit, joined; the device's name
        commits = dict.fromkeys(provenance.short(s) for s in made["segments"])
        assert row["commit"] == "+".join(commits) and row["device"] == made["device"]["name"]
    assert json.loads((swept.folder / "sweep.json").read_text())["runs"] == [r["run"] for r in rows]


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_a_finished_run_is_finished_for_its_own_settings_only(swept):
    point = sweep.read_spec(swept.spec).points[0]

    def changed(**values) -> sweep.Point:
        parameters = {**point.parameters, **values}
        return dataclasses.replace(point, parameters=parameters, config=Config.from_dict(parameters))

    assert sweep.is_finished(point)
    assert sweep.is_finished(changed(device="auto", progress=False, data_dir="elsewhere"))  # where and how, not what
    for values in ({"epochs": 5}, {"weight_decay": 0.0}, {"gradcam_layer": "layer4"}):
        assert not sweep.is_finished(changed(**values))


# --- compare -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.7, 400.0])
def test_t_p_values_match_the_closed_forms(t):
    # df = 1 is the Cauchy distribution, df = 2 has a closed form too.
    assert compare.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10, abs=1e-14)
    assert compare.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10, abs=1e-14)


def test_t_p_values_match_the_tables():
    # Two-sided 5% and 1% critical values of Student's t (any statistics table), and the normal limit.
    for t, df, p in ((12.7062047, 1, 0.05), (4.30265273, 2, 0.05), (2.77644511, 4, 0.05), (2.22813885, 10, 0.05),
                     (3.16927267, 10, 0.01), (2.04227246, 30, 0.05), (1.95996398, 1e7, 0.05)):
        assert compare.t_two_sided_p(t, df) == pytest.approx(p, rel=1e-6)
    assert compare.t_two_sided_p(-2.77644511, 4) == pytest.approx(0.05, rel=1e-6)
    assert compare.t_two_sided_p(math.inf, 3) == 0.0


def test_welch_by_hand():
    a, b = [91.2, 91.6, 91.0], [90.1, 90.9]
    w = compare.welch(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 2
    assert w.difference == pytest.approx(np.mean(a) - np.mean(b))
    assert w.standard_error == pytest.approx(math.sqrt(va + vb))
    assert w.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1))
    assert w.p == pytest.approx(compare.t_two_sided_p(w.t, w.df))
    same = compare.welch([90.0, 90.0], [90.0, 90.0])
    assert (same.t, same.p) == (0.0, 1.0)
    assert compare.welch([91.0, 91.0], [90.0, 90.0]).p == 0.0  # no spread at all: any difference is real
    with pytest.raises(ValueError, match="two seeds per setting"):
        compare.welch([91.0], [90.0, 90.5])


def test_holm_by_hand():
    assert compare.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert compare.holm([0.5, 0.9]) == [1.0, 1.0]


def _swept(groups: dict) -> Sweep:
    """A Sweep of setting lr=VALUE with the given best test accuracies, one run per seed."""
    runs = []
    for lr, values in groups.items():
        for seed, value in enumerate(values, 1):
            summary = {"best_test_acc": value, "final_test_acc": value - 0.5, "best_val_acc": None,
                       "best_epoch": 30 + seed, "seconds": 100.0 * seed}
            runs.append(SweptRun(f"lr={lr},seed={seed}", {"lr": lr, "seed": seed}, summary, [],
                                 np.full(10, value)))
    return Sweep(None, {"lr": list(groups), "seed": [1, 2, 3]}, runs, {})


def test_settings_table_is_mean_and_spread_over_seeds():
    table = compare.settings_table(_swept({0.4: [90.0, 91.0, 92.0], 0.8: [93.0]})).splitlines()
    assert table[0].split() == ["setting", "seeds", "best", "test", "%", "final", "test", "%", "best", "val", "%",
                                "best", "epoch", "seconds"]
    assert table[1].split() == ["lr=0.4", "3", "91.00", "±", "1.00", "90.50", "±", "1.00", "-", "32.0", "±", "1.0",
                                "200.0", "±", "100.0", "s"]
    assert table[2].split() == ["lr=0.8", "1", "93.00", "±", "-", "92.50", "±", "-", "-", "31.0", "±", "-",
                                "100.0", "±", "-", "s"]


def test_differences_tell_a_real_gap_from_seed_noise():
    swept = _swept({0.2: [90.0, 90.2, 90.1], 0.4: [91.5, 91.6, 91.4], 0.8: [90.1, 90.3, 89.9], 1.6: [95.0]})
    found = compare.differences(swept)
    assert len(found) == 3  # lr=1.6 has one seed: no spread to test against
    verdicts = {(d.first, d.second): d.beyond_noise for d in found}
    assert verdicts == {("lr=0.2", "lr=0.4"): True, ("lr=0.4", "lr=0.8"): True, ("lr=0.2", "lr=0.8"): False}
    assert found[0].p_holm == pytest.approx(3 * found[0].test.p)  # corrected for three pairs
    table = compare.differences_table(swept)
    assert "Holm's correction over 3 pair(s), alpha 0.05" in table
    assert "left out, with one finished seed: lr=1.6" in table
    assert re.search(r"lr=0.2 +lr=0.4 +-1.40 .* beyond seed noise", table)
    assert compare.differences_table(_swept({0.4: [90.0, 91.0]})).startswith("one setting only")
    assert compare.differences_table(_swept({0.4: [90.0, 91.0], 0.8: [92.0]})).startswith("fewer than two settings")
    with pytest.raises(ValueError, match="metric must be one of"):
        compare.differences(swept, "test_acc")
    with pytest.raises(ValueError, match="some runs have no best_val_acc"):
        compare.differences(swept, "best_val_acc")


def test_load_sweep_refuses_a_folder_that_is_no_sweep(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} is not a sweep's folder"):
        compare.load_sweep(tmp_path)


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_load_sweep_reads_each_runs_accuracy_per_class(swept, data_dir):
    loaded = compare.load_sweep(swept.folder)
    assert [r.name for r in loaded.runs] == list(swept.third.statuses) and loaded.unfinished == {}
    assert list(loaded.groups()) == ["lr=0.1", "lr=0.8"] and loaded.factors == ["lr"]
    from s11lib.loaders import load_cifar10
    _, labels = load_cifar10(data_dir, train=False)
    for run in loaded.runs:
        predictions = np.load(swept.folder / run.name / "test_predictions.npy")
        right = predictions == labels[:100].numpy()
        overall = 100 * right.mean()
        assert overall == pytest.approx(run.summary["best_test_acc"])
        counts = np.bincount(labels[:100].numpy(), minlength=10)
        assert np.average(run.per_class, weights=counts) == pytest.approx(overall)


@pytest.mark.slow  # the sweep scenario: four runs through papermill, stopped, failed and continued
def test_compare_notebook_runs_under_papermill(swept, data_dir, tmp_path):
    notebook = swept.folder.parents[0] / "compare-run.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "compare.ipynb"), str(notebook), parameters={"sweep_dir": str(swept.folder)},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path), execution_timeout=300)
    outputs = [o for c in nbformat.read(notebook, as_version=4).cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"{swept.folder}: 4 of 4 runs done" in text
    assert re.search(r"lr=0.1 +2 +\d+\.\d\d ± \d+\.\d\d", text) and re.search(r"lr=0.8 +2 ", text)
    assert "Welch's t-test, Holm's correction over 1 pair(s)" in text and "seed noise" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the curves and the classes


def test_compare_warns_when_the_runs_come_from_different_commits_or_torch_versions():
    def made(*segments):
        return {"segments": [{"commit": commit, "dirty": dirty, "torch": torch} for commit, dirty, torch in segments]}

    def swept_run(name, state):
        return SweptRun(name, {"seed": 1}, {}, [], np.zeros(10), state)

    same = [swept_run("a", made(("a" * 40, False, "2.14.1"))), swept_run("b", made(("a" * 40, False, "2.14.1")))]
    assert compare.provenance_warnings(same) == []
    mixed = [swept_run("a", made(("a" * 40, False, "2.14.1"))),
             swept_run("b", made(("a" * 40, False, "2.14.1"), ("b" * 40, True, "2.15.0"))),  # resumed after an upgrade
             swept_run("c", None)]
    assert compare.provenance_warnings(mixed) == [
        "the runs come from 2 different commits (aaaaaaa: a, b; bbbbbbb-dirty: b); part of a difference between "
        "them may be the code's",
        "the runs come from 2 different torch versions (2.14.1: a, b; 2.15.0: b); part of a difference between "
        "them may be the code's",
        "1 runs have no run.json, so what made them is unknown: c"]
