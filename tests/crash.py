"""A child process that SIGKILLs itself at a chosen moment, for the crash tests.

    python tests/crash.py run CONFIG_JSON [--kill-after-step N] [--kill-writing NAME:NTH:BYTES [--steps-meanwhile K]]
    python tests/crash.py write FOLDER BYTES

`run` calls s11lib.run.run(Config(**CONFIG_JSON)) and kills the process
  * after the Nth optimizer step of this process (mid-epoch: nothing of that epoch is saved), once
    the checkpoint writes in flight on the background writer are done, so that where it dies does
    not depend on how fast the disk is; or
  * during the NTH atomic write of the file NAME, once BYTES bytes of it have reached the disk;
    with --steps-meanwhile K, the writer's thread holds there until training has taken K more
    optimizer steps, and dies then: a kill during a background write while the next epoch trains.
    If those steps never come (the write blocked training), it exits with NO_OVERLAP instead.
`write` forks a process per kind of file s11lib writes (KINDS); each writes FOLDER/KIND/f.KIND
with s11lib's atomic writers, then a bigger version of it, and is killed after BYTES bytes of
that. It prints {kind: the signal that ended its process} as JSON.

SIGKILL cannot be caught: no `finally`, no `atexit`, no buffered data flushed. It is the hardest
way a process can die short of losing power. The kill comes from inside the process only so that
it lands at an exact, repeatable point. Linux only (/proc/self/fd names the file being written).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

_real_fdopen = os.fdopen


NO_OVERLAP = 3  # the exit status when --steps-meanwhile's steps did not come during the write
OVERLAP_TIMEOUT = 120.0  # seconds the write waits for them

_steps = [0]  # optimizer steps this process has taken (counted by _count_steps)
_writers = []  # every BackgroundWriter that has been given a write


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _count_steps(on_step=None) -> None:
    """Count every optimizer step of the run (and call on_step with the count after each)."""
    import s11lib.run as run_module

    make_optimizer = run_module.make_optimizer

    def counting(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)

        def hook(*_):
            _steps[0] += 1
            if on_step is not None:
                on_step(_steps[0])
        optimizer.register_step_post_hook(hook)
        return optimizer

    run_module.make_optimizer = counting


def _track_writers() -> None:
    from s11lib.utils import atomic

    submit = atomic.BackgroundWriter.submit

    def tracked(self, *args):
        _writers.append(self)
        return submit(self, *args)

    atomic.BackgroundWriter.submit = tracked


class _KillAfter:
    """A file object that dies once `limit` bytes (or characters) have been written through it;
    with `steps_meanwhile`, only once training has taken that many more steps."""

    def __init__(self, f, limit: int, steps_meanwhile: int = 0):
        self._f, self._left, self._steps_meanwhile = f, limit, steps_meanwhile

    def write(self, data):
        if len(data) >= self._left:
            self._f.write(data[: self._left])
            self._f.flush()
            os.fsync(self._f.fileno())  # the partial file really is on disk when the process dies
            if self._steps_meanwhile:
                until, deadline = _steps[0] + self._steps_meanwhile, time.monotonic() + OVERLAP_TIMEOUT
                while _steps[0] < until:
                    if time.monotonic() > deadline:
                        print(f"no overlap: {self._steps_meanwhile} steps did not come during the write",
                              file=sys.stderr, flush=True)
                        os._exit(NO_OVERLAP)
                    time.sleep(0.01)
                print(f"dying at step {_steps[0]}", file=sys.stderr, flush=True)
            die()
        self._left -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


def kill_while_writing(name: str, nth: int, limit: int, steps_meanwhile: int = 0) -> None:
    """Make the nth atomic write of the file `name` die after `limit` bytes (see _KillAfter)."""
    count = itertools.count(1)

    def fdopen(fd, *args, **kwargs):
        f = _real_fdopen(fd, *args, **kwargs)
        written = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # atomic_open's ".NAME.XXXX.tmp"
        if written.startswith(f".{name}.") and next(count) == nth:
            return _KillAfter(f, limit, steps_meanwhile)
        return f

    os.fdopen = fdopen


def kill_after_step(n: int) -> None:
    def maybe_die(step: int) -> None:
        if step == n:
            for writer in _writers:
                writer.wait(raise_error=False)
            die()

    _count_steps(maybe_die)


KINDS = ("torch", "json", "csv", "npz", "npy", "png")


def write_all(folder: Path, limit: int) -> dict[str, int]:
    """One forked process per kind (the imports are paid once); the signal that ended each."""
    import matplotlib.figure  # noqa: F401 - imported before forking
    import torch  # noqa: F401

    ended = {}
    for kind in KINDS:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        pid = os.fork()
        if pid == 0:
            try:
                write(kind, folder / kind, limit)
            finally:
                os._exit(1)  # only reached if the kill did not come
        _, status = os.waitpid(pid, 0)
        ended[kind] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
    return ended


def write(kind: str, folder: Path, limit: int) -> None:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

    from s11lib.run import write_metrics
    from s11lib.utils import atomic

    path = folder / f"f.{kind}"
    writers = {
        "torch": lambda size: atomic.save_torch({"w": torch.arange(size)}, path),
        "json": lambda size: atomic.save_json({"values": list(range(size))}, path),
        "csv": lambda size: write_metrics([{"epoch": i, "lr": 0.1} for i in range(size)], path),
        "npz": lambda size: atomic.save_npz(path, a=np.arange(size)),
        "npy": lambda size: _save_npy(atomic, path, np.arange(size)),
        "png": lambda size: atomic.save_figure(_figure(Figure, size), path),
    }
    writers[kind](10)  # the old file, complete
    kill_while_writing(path.name, 1, limit)
    writers[kind](10_000)  # the new one: dies part way


def _save_npy(atomic, path, array):
    import numpy as np
    with atomic.atomic_open(path, "wb") as f:
        np.save(f, array)


def _figure(Figure, size):
    fig = Figure(figsize=(2 + size / 2000, 2))
    fig.add_subplot().plot(range(size))
    return fig


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("config")
    r.add_argument("--kill-after-step", type=int)
    r.add_argument("--kill-writing")
    r.add_argument("--steps-meanwhile", type=int, default=0)
    w = sub.add_parser("write")
    w.add_argument("folder", type=Path)
    w.add_argument("bytes", type=int)
    args = parser.parse_args()
    if args.command == "write":
        print(json.dumps(write_all(args.folder, args.bytes)))
        return
    from s11lib.config import Config
    from s11lib.run import run

    _track_writers()
    if args.kill_after_step:
        kill_after_step(args.kill_after_step)
    else:
        _count_steps()
    if args.kill_writing:
        name, nth, limit = args.kill_writing.split(":")
        kill_while_writing(name, int(nth), int(limit), args.steps_meanwhile)
    run(Config(**json.loads(args.config)))


if __name__ == "__main__":
    sys.exit(main())
