"""Write files so that a crash leaves the old file or the new one, never half of one.

Each writer writes a temporary file in the target's folder (same file system, so the rename is
atomic), flushes it to disk and `os.replace`s it over the target. On any error the temporary
file is removed and the target is untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import torch


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (the only portable way is to set it and put it back)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Like open(path, mode) for writing, but the file appears at `path` only when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
