"""The README's quick start as a new user meets it: scripts/train.sh (s11lib/notebook.py), the
set-up both commands share (scripts/setup-env.sh), the CLI's --help, and the README's commands.

The driver's decisions are checked with papermill's execution replaced by a stand-in (no kernel:
fast); tests/test_notebook.py runs the real thing end to end, and so does one test here.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from papermill.exceptions import PapermillExecutionError

import s11lib.notebook as driver
from s11lib.config import Config, field_help, field_names
from s11lib.run import _parser

ROOT = Path(__file__).parents[1]
# The README and the docs/ pages it links: the commands a user copies from them.
# A command continued over lines (a trailing backslash) is one command.
PAGES = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]).replace(
    "\\\n", " ")


class FakePapermill:
    """Stands in for the notebook's execution: records what papermill was asked, writes the notebook
    it would write, and fails as `fail` says: (exception name, message), as the kernel reports them."""

    def __init__(self):
        self.calls: list[dict] = []
        self.fail: tuple[str, str] | None = None

    def __call__(self, ctx, kernel_args=()) -> int:
        self.calls.append({**ctx.params, "kernel_args": list(kernel_args)})
        Path(ctx.params["output_path"]).write_text(f"executed notebook {len(self.calls)}")
        if self.fail:
            raise PapermillExecutionError(7, 3, "run(config)", *self.fail, ["traceback"])
        return 0


@pytest.fixture
def papermill(monkeypatch, tmp_path) -> FakePapermill:
    fake = FakePapermill()
    monkeypatch.setattr(driver, "_invoke", fake)
    monkeypatch.chdir(tmp_path)
    return fake


def test_the_notebook_goes_into_its_run_folder_and_earlier_ones_are_kept(papermill, tmp_path,
                                                                          capsys):
    for _ in range(3):  # a run, its continuation after a crash, and a third call (figures redrawn)
        assert driver.main(["-p", "out_dir", "runs/a", "-p", "epochs", "3"]) == 0
    run = tmp_path / "runs" / "a"
    assert {p.name: p.read_text() for p in run.iterdir()} == {
        "train.ipynb": "executed notebook 3", "train.1.ipynb": "executed notebook 1",
        "train.2.ipynb": "executed notebook 2"}
    # Another out_dir never touches the first run's notebook.
    assert driver.main(["-p", "out_dir", "runs/b"]) == 0
    assert (tmp_path / "runs" / "b" / "train.ipynb").is_file() and len(list(run.iterdir())) == 3
    # What papermill was asked: the output streamed to this process's terminal, its cell counter off,
    # the parameters as given, relative paths from where the command runs.
    params = papermill.calls[0]
    assert params["stdout_file"] is sys.stdout and params["stderr_file"] is sys.stderr
    assert params["progress_bar"] is False and params["cwd"] == "."
    # papermill's banners and the kernel's own log stay off the terminal.
    assert params["log_level"] == "WARNING" and params["kernel_args"] == driver.KERNEL_QUIET
    assert params["parameters"] == (("out_dir", "runs/a"), ("epochs", "3"))
    assert params["output_path"] == str(Path("runs/a/train.ipynb"))
    assert "the executed notebook: runs/a/train.ipynb" in capsys.readouterr().err


def test_out_dir_from_a_parameters_file_and_an_output_path_given(papermill, tmp_path):
    # papermill's order: -f files first, then -p; the last word on out_dir decides where the notebook goes.
    (tmp_path / "smoke.yaml").write_text("out_dir: runs/from-file\nepochs: 2\n")
    assert driver.main(["-f", "smoke.yaml"]) == 0
    assert driver.main(["-f", "smoke.yaml", "-p", "out_dir", "runs/from-p"]) == 0
    assert [c["output_path"] for c in papermill.calls] == [str(Path("runs/from-file/train.ipynb")),
                                                          str(Path("runs/from-p/train.ipynb"))]
    # An output path on the command line is taken as it is; so are papermill's own options.
    assert driver.main(["mine.ipynb", "--progress-bar", "--cwd", "sub"]) == 0
    assert papermill.calls[-1]["output_path"] == "mine.ipynb" and papermill.calls[-1]["progress_bar"] is True
    assert papermill.calls[-1]["cwd"] == "sub"


@pytest.mark.parametrize("args, message", [
    (["-p", "epoch", "2"], "unknown parameter 'epoch' (did you mean 'epochs'?)"),
    (["-p", "batchsize", "64", "-p", "lr", "0.4"], "unknown parameter 'batchsize' (did you mean 'batch_size'?)"),
    (["-y", "ephocs: 2"], "unknown parameter 'ephocs' (did you mean 'epochs'?)"),
    (["-p", "epochs", "two"], "epochs must be an integer, got 'two' (str)"),
    (["-p", "train_subset", "2000"], "val_size=5000 holds out all of the train_subset=2000 images; pass val_size=200"),
    (["--epochs", "2"], "No such option '--epochs'; parameters are passed as -p NAME VALUE: -p epochs ..."),
    (["--bogus"], "No such option '--bogus'; `bash scripts/train.sh --help` lists papermill's options"),
])
def test_bad_input_is_one_line_before_a_kernel_starts(papermill, tmp_path, capsys, args, message):
    assert driver.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert papermill.calls == [] and list(tmp_path.iterdir()) == []


def test_bad_input_found_in_the_run_leaves_nothing_behind(papermill, tmp_path, capsys):
    # A folder it made is removed again; an earlier run's notebook is put back.
    args = ["-p", "out_dir", "new/deep/run"]
    papermill.fail = ("DatasetError", "data: no such folder")
    assert driver.main(args) == 2
    assert capsys.readouterr().err == "error: data: no such folder\n"
    assert list(tmp_path.iterdir()) == []
    run = tmp_path / "old"
    run.mkdir()
    (run / "train.ipynb").write_text("the first run's")
    papermill.fail = ("CheckpointError", "lr differs")
    assert driver.main(["-p", "out_dir", "old"]) == 2
    assert [(p.name, p.read_text()) for p in run.iterdir()] == [("train.ipynb", "the first run's")]


def test_other_failures_keep_the_notebook_and_say_where(papermill, tmp_path, capsys):
    papermill.fail = ("NonFiniteLossError", "non-finite loss at epoch 3, batch 7; lower lr")
    assert driver.main(["-p", "out_dir", "r"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: non-finite loss at epoch 3, batch 7; lower lr (the executed notebook: " \
                  f"{Path('r/train.ipynb')})\n"
    papermill.fail = ("DivergedError", "training diverged at epoch 4: its mean loss 5.466e+05 is over 10 times ...")
    assert driver.main(["-p", "out_dir", "r"]) == 1  # a finite blow-up: the same one line
    assert capsys.readouterr().err.startswith("error: training diverged at epoch 4: its mean loss 5.466e+05")
    papermill.fail = ("RuntimeError", "a bug")
    assert driver.main(["-p", "out_dir", "r"]) == 1
    err = capsys.readouterr().err  # a bug: papermill's report with its traceback, then where the notebook is
    assert "traceback" in err and err.rstrip().endswith(f"with this traceback: {Path('r/train.ipynb')}")
    papermill.fail = ("KeyboardInterrupt", "")  # Ctrl-C: the kernel gets it too
    assert driver.main(["-p", "out_dir", "r"]) == 130  # in epoch 1: no last.pt yet
    assert capsys.readouterr().err == ("\ninterrupted before the first epoch ended: there is nothing to continue "
                                       "from yet; the same command starts the run again\n")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["train.1.ipynb", "train.2.ipynb", "train.3.ipynb",
                                                                "train.ipynb"]
    (tmp_path / "r" / "last.pt").write_text("an epoch done")
    assert driver.main(["-p", "out_dir", "r"]) == 130
    assert capsys.readouterr().err == f"\ninterrupted; the same command continues the run from {Path('r/last.pt')}\n"


def test_sigterm_stops_like_ctrl_c(papermill, tmp_path, monkeypatch, capsys):
    # `kill`, `timeout` or a job scheduler: papermill then shuts its kernel down (nbclient's cleanup),
    # where a plain SIGTERM would leave the kernel training on, orphaned.
    import signal
    import time

    def killed(ctx, kernel_args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        pytest.fail("SIGTERM did not stop the run")
    monkeypatch.setattr(driver, "_invoke", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert driver.main(["-p", "out_dir", "r"]) == 130
    assert "\ninterrupted before the first epoch ended" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    import logging
    assert logging.root.manager.disable == logging.NOTSET  # the logs it silenced are back


def test_an_out_dir_in_use_is_refused_before_anything_moves(papermill, tmp_path, capsys):
    import fcntl
    run = tmp_path / "busy"
    run.mkdir()
    (run / "train.ipynb").write_text("the running one's")
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running s11lib.run holds
        assert driver.main(["-p", "out_dir", "busy"]) == 2
    finally:
        os.close(fd)
    assert "another run is writing to busy" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["train.ipynb"] and papermill.calls == []


def test_offline_without_data_is_one_line_and_leaves_no_folders(tmp_path):
    # The real thing, kernel and all: the README's first command on a machine without the data and
    # without internet. The download cannot be tried here (CI may be online), so download=False.
    done = subprocess.run([sys.executable, "-m", "s11lib.notebook", "-p", "data_dir", "data", "-p", "download",
                           "False", "-p", "out_dir", "runs/train"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("error: data/cifar-10-batches-py: no such folder"), done.stderr
    assert "Traceback" not in done.stderr and "---------" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/, no data/


def test_ctrl_c_at_a_terminal_prints_one_line(data_dir, tmp_path):
    # The real thing, kernel and all, as a terminal delivers Ctrl-C: SIGINT to the whole process
    # group. It used to print ~20 lines of the kernel's ZMQError and papermill's banners first.
    import signal
    import time
    # The whole training set at batch 16: an epoch of minutes on the real data, seconds on the synthetic.
    command = [sys.executable, "-m", "s11lib.notebook", "-p", "data_dir", str(data_dir), "-p", "download", "False",
               "-p", "width", "16", "-p", "epochs", "2", "-p", "batch_size", "16", "-p", "val_size", "32",
               "-p", "test_subset", "32", "-p", "out_dir", "r"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        child = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Epoch 1:" not in err_path.read_text():  # training has started
            assert child.poll() is None and time.monotonic() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGINT)
        assert child.wait(timeout=60) == 130
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    err = err_path.read_text()
    assert "ZMQError" not in err and "IPKernelApp" not in err and "Input Notebook" not in err, err[-3000:]
    assert "Kernel died" not in err and "Traceback" not in err, err[-3000:]
    # Which line depends on whether the first epoch had ended (it has not, on the real data).
    assert err.rstrip().splitlines()[-1] == (
        f"interrupted; the same command continues the run from {Path('r/last.pt')}" if (tmp_path / "r" / "last.pt").exists()
        else "interrupted before the first epoch ended: there is nothing to continue from yet; the same command "
             "starts the run again")


# --- the set-up both commands share ----------------------------------------------------------------
def test_setup_installs_only_when_something_changed(tmp_path):
    """scripts/setup-env.sh with a stand-in .venv/bin/python that records pip calls; files in the
    folder say what the stand-in environment can import."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup-env.sh").write_text((ROOT / "scripts" / "setup-env.sh").read_text())
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 's11lib'\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "pip.log"
    (bin_dir / "python").write_text(f"""#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> {log}; exit 0; fi
case "$2" in
  "import s11lib") [ -e {tmp_path}/s11lib-imports ]; exit $?;;
  "import torch, torchvision") [ -e {tmp_path}/torch-imports ]; exit $?;;
  *"find_spec('torch')"*) [ -e {tmp_path}/torch-installed ]; exit $?;;
  *"urlopen"*) [ -e {tmp_path}/index-reachable ]; exit $?;;
esac
exec {sys.executable} "$@"
""")
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text("")

    def setup(extras="", torch_index="") -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        subprocess.run(["bash", "-c", f"set -e; S11_EXTRAS={extras} S11_TORCH_INDEX={torch_index} "
                                      "source scripts/setup-env.sh"], cwd=tmp_path, check=True, capture_output=True,
                       timeout=120)
        return log.read_text().splitlines()[len(before):] if log.exists() else []

    for name in ("s11lib-imports", "torch-imports", "torch-installed", "index-reachable"):
        (tmp_path / name).write_text("")
    install = "-m pip install -q --disable-pip-version-check"
    assert setup() == [f"{install} -e ."]  # the first time
    assert setup() == []  # nothing changed: no pip at all
    assert setup("test") == [f"{install} -e .[test]"]
    assert setup("test") == [] and setup() == []  # the test install includes the base one
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 's11lib'\nversion = '2'\n")
    assert setup() == [f"{install} -e ."]  # pyproject.toml changed
    (tmp_path / "s11lib-imports").unlink()
    assert setup() == [f"{install} -e ."]  # s11lib cannot be imported (the checkout moved, say)
    # A chosen PyTorch index is used only while torch is not installed yet.
    (tmp_path / "s11lib-imports").write_text("")
    index = "https://download.pytorch.org/whl/cpu"
    (tmp_path / ".venv" / ".s11lib-installed").unlink()
    assert setup(torch_index=index) == [f"{install} -e ."]  # torch is there already: the index is not asked
    (tmp_path / "torch-installed").unlink()
    (tmp_path / ".venv" / ".s11lib-installed").unlink()
    assert setup(torch_index=index) == [f"{install} --retries 2 --timeout 30 --index-url {index} torch torchvision",
                                        f"{install} -e ."]
    # An index that cannot be reached stops the set-up in one line, before pip runs.
    (tmp_path / "index-reachable").unlink()  # torch is still not installed: the stand-in says so
    (tmp_path / ".venv" / ".s11lib-installed").unlink()
    pip_calls = log.read_text()
    with pytest.raises(subprocess.CalledProcessError) as e:
        setup(torch_index=index)
    assert e.value.stderr.decode().splitlines() == [
        f"error: S11_TORCH_INDEX={index} cannot be reached from here; run without it to take PyPI's torch "
        "(a CUDA build, which runs on the CPU too)"] and log.read_text() == pip_calls
    (tmp_path / "torch-installed").write_text("")
    assert setup() == [f"{install} -e ."]
    # torch and torchvision that do not import together stop the set-up, and no stamp is written.
    (tmp_path / "torch-imports").unlink()
    (tmp_path / ".venv" / ".s11lib-installed").unlink()
    with pytest.raises(subprocess.CalledProcessError) as e:
        setup()
    assert b"do not import together" in e.value.stderr
    assert not (tmp_path / ".venv" / ".s11lib-installed").exists()


# --- the CLI ---------------------------------------------------------------------------------------
def test_cli_help_says_what_each_option_means():
    text = _parser().format_help()
    helps = field_help()
    for name in field_names():
        assert helps[name], f"{name} has no comment in s11lib/config.py"
        # argparse wraps lines, at hyphens too: compare without whitespace.
        assert f"--{name.replace('_', '-')}" in text and "".join(helps[name].split()) in "".join(text.split()), name
    assert helps["val_size"].endswith("0 watches the test set instead, as the original assignment did")


# --- the commands of the README and docs/ ---------------------------------------------------------
def _documented_commands(prefix: str) -> list[list[str]]:
    """Each command starting with `prefix` in the README or a docs/ page, in a code block or inline
    code, without its trailing comment."""
    found = re.findall(re.escape(prefix) + r"[^`\n]*", PAGES)
    return [shlex.split(command.split("  #")[0]) for command in found]


def test_documented_commands_have_valid_parameters():
    """Every `bash scripts/train.sh ...` and `python -m s11lib.run ...` in the README and docs/ pass the
    checks that come before the data (names, types, values, val_size against train_subset)."""
    from papermill.cli import _resolve_type
    commands = _documented_commands("bash scripts/train.sh")
    assert len(commands) >= 4, commands
    for command in commands:
        args = command[2:]
        assert all(a == "-p" for a in args[::3]), command
        Config.from_dict({name: _resolve_type(value) for name, value in zip(args[1::3], args[2::3])})
    clis = [c for c in _documented_commands("python -m s11lib.run --") if "--help" not in c]
    assert len(clis) >= 2, clis  # the quick one, the CPU run of the heatmap checks
    launches = _documented_commands("torchrun --")
    assert len(launches) >= 2, launches  # one machine, several machines
    for options in [*(c[3:] for c in clis), *(c[c.index("s11lib.run") + 1:] for c in launches)]:
        args, extra = _parser().parse_known_args(options)
        assert not extra, extra
        Config(**vars(args))
    from torch.distributed.run import get_args_parser  # torchrun's own parser takes the launcher's options
    for launch in launches:
        get_args_parser().parse_args(launch[1:])


def test_cpu_smoke_run_is_the_documented_one():
    # docs/training.md quotes its figures; they were measured with exactly this command.
    (smoke,) = [c for c in _documented_commands("bash scripts/train.sh") if "runs/cpu-smoke" in c]
    values = dict(zip(smoke[3::3], smoke[4::3]))
    assert values == {"data_dir": "../shared/datasets/cifar10", "download": "False", "width": "16",
                      "train_subset": "20000", "val_size": "2000", "test_subset": "2000", "epochs": "8",
                      "batch_size": "64", "out_dir": "runs/cpu-smoke"}
