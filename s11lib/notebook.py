"""notebooks/train.ipynb through papermill, as `scripts/train.sh` runs it: papermill's own command
line, with what a person at a terminal needs on top.

    python -m s11lib.notebook [papermill options]      # e.g. -p epochs 5 -p out_dir runs/short

* **The parameters are checked before a kernel starts.** An unknown name (`-p epoch 2`) is a
  one-line error naming the closest parameter (papermill itself only warns and runs on with the
  default), and so is an impossible value.
* **The executed notebook lives with its run**: `OUT_DIR/train.ipynb`, so runs with different
  `out_dir`s never overwrite each other's. When one is there already (a run continued after a
  crash, or run again), it is kept as `train.1.ipynb`, `train.2.ipynb`, ...; an output path
  given on the command line is used as it is.
* **The run shows on the terminal**: the notebook's printed output (the model summary, the
  epoch bars, the test lines) is streamed as it comes, instead of papermill's cell counter.
* **Errors are one line.** Bad input (the ValueErrors of s11lib: config, data, out_dir,
  checkpoint) prints `error: ...` and exits 2, leaving nothing behind: the notebook it began
  and any folder it made are removed again. A diverged run prints its one line and exits 1, and
  any other failure prints papermill's report with the traceback and exits 1; both keep the
  executed notebook, which shows where it stopped.
* **Ctrl-C and SIGTERM** (`kill`, `timeout`, a job scheduler) shut the kernel down (a SIGTERM to
  papermill alone would leave it training, orphaned), say how to continue (or, before the first
  epoch ended, that there is nothing to continue yet), and exit 130.
* **Quiet**: papermill's banners (log level WARNING unless `--log-level` is given) and the
  kernel's own log (`KERNEL_QUIET`) stay off the terminal.

The checks in the notebook itself (`Config.from_notebook`) still stop an unknown parameter
passed through papermill's own entry points (`papermill` on the command line,
`papermill.execute_notebook`), a little later: after the kernel has started.
"""
from __future__ import annotations

import base64
import functools
import logging
import signal
import sys
from pathlib import Path

import click
import yaml
from click.core import ParameterSource
from papermill import cli as papermill_cli
from papermill.cli import _resolve_type
from papermill.cli import papermill as papermill_command
from papermill.exceptions import PapermillExecutionError
from papermill.iorw import NoDatesSafeLoader, read_yaml_file

from s11lib.checkpoint import CheckpointError
from s11lib.config import Config, field_names
from s11lib.loaders import DatasetError
from s11lib.utils import atomic
from s11lib.utils.train_test import DivergedError, NonFiniteLossError

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "train.ipynb"
PROG = "bash scripts/train.sh"
# The kernel reports an exception by its class name. s11lib raises ValueError and its subclasses
# for every bad input (docs/failures.md), as the CLI assumes too.
BAD_INPUT = tuple(error.__name__ for error in (ValueError, DatasetError, CheckpointError))
DIVERGED = (DivergedError.__name__, NonFiniteLossError.__name__)
# The ipykernel's own log goes to the terminal, not into the notebook: a warning about TCP at every
# start, and on Ctrl-C about 20 lines of ZMQError as papermill closes the sockets under a reply.
# Errors of the notebook's code still reach the terminal (through the notebook's outputs), and a
# kernel that dies is still reported by papermill.
KERNEL_QUIET = ["--IPKernelApp.log_level=CRITICAL"]


def parameters_of(params: dict) -> dict:
    """The parameters papermill will inject, merged from its options the way its command line does
    (papermill/cli.py): base64, then files, then YAML strings, then -p (typed), then -r (raw)."""
    merged: dict = {}
    for text in params["parameters_base64"] or ():
        merged.update(yaml.load(base64.b64decode(text), Loader=NoDatesSafeLoader) or {})
    for path in params["parameters_file"] or ():
        merged.update(read_yaml_file(path) or {})
    for text in params["parameters_yaml"] or ():
        merged.update(yaml.load(text, Loader=NoDatesSafeLoader) or {})
    for name, value in params["parameters"] or ():
        merged[name] = _resolve_type(value)
    for name, value in params["parameters_raw"] or ():
        merged[name] = value
    return merged


def _keep_earlier(notebook: Path) -> Path | None:
    """Move an executed notebook already at `notebook` to the first free NAME.N.ipynb; return where."""
    if not notebook.exists():
        return None
    n = 1
    while (kept := notebook.with_name(f"{notebook.stem}.{n}{notebook.suffix}")).exists():
        n += 1
    notebook.rename(kept)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not NOTEBOOK.is_file():
        print(f"error: {NOTEBOOK} not found; run this from a checkout of the s11lib repository", file=sys.stderr)
        return 2
    try:
        ctx = papermill_command.make_context(PROG, [str(NOTEBOOK), *argv])
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.ClickException as e:
        name = getattr(e, "option_name", "").lstrip("-").replace("-", "_")
        hint = (f"parameters are passed as -p NAME VALUE: -p {name} ..." if name in field_names()
                else f"`{PROG} --help` lists papermill's options")
        print(f"error: {e.format_message().rstrip('.')}; {hint}", file=sys.stderr)
        return 2
    params = ctx.params
    if params["help_notebook"]:
        with ctx:
            return _invoke(ctx)

    parameters = parameters_of(params)
    try:  # every name and value, before a kernel starts (the data and out_dir come in the run)
        config = Config.from_dict({k: v for k, v in parameters.items() if not k.startswith("PAPERMILL_")})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cwd = Path(params["cwd"] or ".")
    out_dir = cwd / config.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: out_dir {out_dir} is a file, not a folder", file=sys.stderr)
        return 2
    if out_dir.is_dir():
        try:  # a second run into the same out_dir would otherwise move the first one's notebook aside
            with atomic.exclusive(out_dir):
                pass
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    output = Path(params["output_path"]) if params["output_path"] else out_dir / NOTEBOOK.name
    made = atomic.make_folder(output.parent)
    kept = _keep_earlier(output)
    params["output_path"] = str(output)
    for stream, name in ((sys.stdout, "stdout_file"), (sys.stderr, "stderr_file")):
        if ctx.get_parameter_source(name) is ParameterSource.DEFAULT:
            params[name] = stream  # the notebook's printed output, as it comes
    if ctx.get_parameter_source("progress_bar") is ParameterSource.DEFAULT:
        params["progress_bar"] = False  # papermill's cell counter would cut through the epoch bars
    if ctx.get_parameter_source("cwd") is ParameterSource.DEFAULT:
        params["cwd"] = "."  # paths in the parameters are relative to where the command runs
    if ctx.get_parameter_source("log_level") is ParameterSource.DEFAULT:
        params["log_level"] = "WARNING"  # papermill's banners (Input Notebook: ...) would bury the run's lines
    kernel_args = KERNEL_QUIET if params["kernel"] in (None, "python3") else []

    def interrupted() -> str:
        if (out_dir / "last.pt").is_file():
            return f"\ninterrupted; the same command continues the run from {out_dir / 'last.pt'}"
        return ("\ninterrupted before the first epoch ended: there is nothing to continue from yet; "
                "the same command starts the run again")

    def stop(signum, frame):
        # Ctrl-C, and `kill`, a job scheduler, `timeout`: shut the kernel down as Ctrl-C does. The
        # kernel, interrupted too, may die under nbclient's wait ("Kernel died while waiting",
        # asyncio's "Task exception was never retrieved" at exit): logs that would follow the one line.
        logging.disable(logging.CRITICAL)
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    logs_off_before = logging.root.manager.disable
    try:
        with ctx:
            code = _invoke(ctx, kernel_args)
    except PapermillExecutionError as e:
        if e.ename in BAD_INPUT:
            output.unlink(missing_ok=True)  # bad input leaves nothing behind
            if kept:
                kept.rename(output)
            atomic.remove_made(made)
            print(f"error: {e.evalue}", file=sys.stderr)
            return 2
        if e.ename == "KeyboardInterrupt":  # Ctrl-C reaches the kernel too
            print(interrupted(), file=sys.stderr)
            return 130
        if e.ename in DIVERGED:
            print(f"error: {e.evalue} (the executed notebook: {output})", file=sys.stderr)
            return 1
        print(f"{e}\nerror: the notebook failed ({e.ename}); the executed notebook, with this traceback: {output}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted(), file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logging.disable(logs_off_before)
    if code == 0:
        print(f"the executed notebook: {output}; the run's files: {out_dir}", file=sys.stderr)
    return code


def _invoke(ctx: click.Context, kernel_args: list[str] = ()) -> int:
    """papermill's command, with `kernel_args` added to the kernel's command line (papermill's CLI
    has no option for them; its execute_notebook passes them to nbclient as `extra_arguments`)."""
    real = papermill_cli.execute_notebook
    if kernel_args:
        papermill_cli.execute_notebook = functools.partial(real, extra_arguments=list(kernel_args))
    try:
        papermill_command.invoke(ctx)
    except SystemExit as e:  # papermill exits 138 when the kernel died
        return e.code if isinstance(e.code, int) else 1
    finally:
        papermill_cli.execute_notebook = real
    return 0


if __name__ == "__main__":
    exit_code = main()
    if exit_code == 130:  # interrupted: asyncio logs the dead kernel's tasks as they are collected, at exit
        logging.disable(logging.CRITICAL)
    sys.exit(exit_code)
