"""Write files so that a crash leaves the old file or the new one, never half of one.

Each writer writes a temporary file in the target's folder (same file system, so the rename is
atomic), flushes it to disk and `os.replace`s it over the target. On any error the temporary
file is removed and the target is untouched; after a SIGKILL it stays behind as `.NAME.*.tmp`,
never as NAME, and `remove_leftovers` clears it on the next run.

`BackgroundWriter` runs such writes on a thread, one at a time, so that a run's checkpoints are
written while its next epoch trains.

`exclusive` keeps two runs from writing into one folder at once. `make_folder` and `remove_made`
let a step that fails take back the empty folders it made (a failed download, a refused run).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
import torch


TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (the only portable way is to set it and put it back)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Like open(path, mode) for writing, but the file appears at `path` only when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file open()'s usual mode
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_torch(obj, path: str | os.PathLike) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_json(obj, path: str | os.PathLike) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", **kwargs)


class BackgroundWriter:
    """Runs writes on a thread of their own, one at a time, in the order they were submitted.

    `submit` first waits for the write in flight, so at most one runs and a later one never
    overtakes it. An error in a write is raised in the caller's thread by the next `submit` or
    `wait`. The thread is not a daemon: a program that ends, even by an exception, first lets the
    write in flight finish. A SIGKILL ends it part way like any other write here, which the atomic
    writers above make harmless: the target keeps its previous whole version.
    """

    def __init__(self, name: str = "s11lib-writer"):
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[..., None], *args) -> None:
        """Wait for the write in flight (raising its error, if any), then start `write(*args)`.
        What `args` hold must not change meanwhile: pass copies."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write, args), name=self._name)
        self._thread.start()

    def _run(self, write: Callable[..., None], args: tuple) -> None:
        try:
            write(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by wait()
            self._error = e

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.wait(raise_error=kind is None)  # an error already on its way is not replaced by the write's

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight is done; raise its error unless `raise_error` is False
        (when the caller is already handling an error of its own)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def make_folder(folder: str | os.PathLike) -> list[Path]:
    """`mkdir -p folder`; returns the folders this made, deepest first, for `remove_made`."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders `make_folder` made, deepest first, as long as they are empty: nothing that
    was put there meanwhile is touched."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            break


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder`; return their paths."""
    leftovers = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in leftovers:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return leftovers


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory lock on `folder` (flock on the folder itself: no file is created).

    A second holder gets a one-line ValueError. The kernel drops the lock when the process dies,
    however it dies, so a crashed run never leaves a stale lock. Where locks are not supported
    (some network or FUSE file systems, Windows) this does nothing.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another run is writing to {folder}; wait for it or use another out_dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)
