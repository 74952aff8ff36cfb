"""CIFAR-10 on disk -> uint8 tensors -> batches on the training device.

Reading: the standard `cifar-10-batches-py` layout (the official `cifar-10-python.tar.gz`), read
here rather than through torchvision, with a restricted unpickler that admits only the three numpy
globals the format needs, so a crafted file cannot run code. Every array is checked (shape, dtype,
label range) and a missing or corrupt data set is a one-line `DatasetError` naming the folder.

Downloading: with `download=True` and no data, the official archive is fetched, its md5 checked,
and unpacked into a temporary folder that is renamed into place only when complete.

Batching: `DeviceLoader` keeps a whole split as uint8 on the device (150 MB for the training set;
it's faster to load and convert uint8 than to move preprocessed floats), shuffles with `randperm`
there and applies the batched transforms of `s11lib.transforms`. No worker processes, no
per-image Python.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from s11lib.config import val_size_error
from s11lib.constants import IMAGE_SHAPE, NUM_CLASSES
from s11lib.distributed import Ranks
from s11lib.utils import atomic

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the official archive
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
PIXELS = int(np.prod(IMAGE_SHAPE))  # 3072 values per row: 1024 red, 1024 green, 1024 blue


try:  # numpy 2 moved numpy.core to numpy._core; the files name the old path
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct


class DatasetError(ValueError):
    """The data set is missing, incomplete, corrupt or not CIFAR-10; the message says which."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled numpy array needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 writes an array's bytes at protocol 2 as encode(str, "latin1")
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")
        if name == "_reconstruct":
            return _reconstruct
        if name == "encode":
            return _latin1_encode
        return getattr(np, name)


def _latin1_encode(text: str, encoding: str) -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"only latin1 encode is allowed in a CIFAR-10 batch, got {encoding!r}")
    return text.encode("latin1")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path.parent}: missing {path.name} (expected the {FOLDER} layout)")
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError(f"{path}: expected keys 'data' (numpy array) and 'labels'")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise DatasetError(f"{path}: expected 'data' uint8 of shape (N, {PIXELS}), got {data.dtype} {data.shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{path}: 'labels' must be a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def dataset_folder(data_dir: str | os.PathLike) -> Path:
    """The `cifar-10-batches-py` folder under `data_dir` (or `data_dir` itself if it is that folder)."""
    root = Path(data_dir)
    return root if root.name == FOLDER else root / FOLDER


def load_cifar10(data_dir: str | os.PathLike, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split: images uint8 (N, 3, 32, 32) and labels int64 (N,), in file order.

    Args:
        data_dir: the folder that holds `cifar-10-batches-py/`.
        train: the 50,000 training images, else the 10,000 test images.
        download: fetch the official archive when the folder is missing.
    """
    folder = dataset_folder(data_dir)
    if not folder.is_dir():
        if not download:
            raise DatasetError(f"{folder}: no such folder; put the CIFAR-10 '{FOLDER}' folder there or pass download=True")
        download_cifar10(folder.parent)
    parts = [_read_batch(folder / name) for name in (TRAIN_FILES if train else TEST_FILES)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(root: str | os.PathLike, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch the official archive into `root`, check its md5 and unpack `cifar-10-batches-py`.

    Nothing is left half-written: the archive and the unpacked folder live in a temporary folder
    inside `root` until the folder is complete, then the folder is renamed into place.
    `url` and `md5` default to the official archive's (read at call time, so tests can point
    the module's URL at a local server).
    """
    url, md5 = url or URL, md5 or ARCHIVE_MD5
    root = Path(root)
    made = atomic.make_folder(root)
    try:
        return _download_into(root, url, md5)
    except BaseException:
        atomic.remove_made(made)  # a failed download leaves no empty data folder behind
        raise


def _download_into(root: Path, url: str, md5: str) -> Path:
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar10-download-") as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f, \
                    tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                         desc="downloading CIFAR-10") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DatasetError(
                f"could not download CIFAR-10 from {url} ({reason}); without internet, copy the "
                f"'{FOLDER}' folder into {root} yourself, or point data_dir at the folder that holds it"
            ) from None
        got = _md5(archive)
        if got != md5:
            raise DatasetError(f"{url}: downloaded archive has md5 {got}, expected {md5}; try again")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{FOLDER}/") and m.isfile()]
            if not members:
                raise DatasetError(f"{url}: archive holds no '{FOLDER}' folder")
            # The "data" filter refuses absolute paths, links out of the folder and devices.
            tar.extractall(unpacked, members=members, filter="data")
        target = root / FOLDER
        try:
            os.replace(unpacked / FOLDER, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process (a data-parallel run's other machine, on a shared disk) unpacked the
            # same archive there first: keep its folder, ours is removed with the temporary one.
    return target


def split_indices(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of range(n) into (train, val) index tensors, each sorted.

    The split has its own seed (not the run's) so runs with different seeds hold out the same
    images and their validation figures compare.
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


class DeviceLoader:
    """Batches of a uint8 image set kept on one device, transformed there as whole batches.

    Args:
        images: uint8 (N, 3, H, W).
        labels: int64 (N,).
        batch_size: images per batch; the last batch may be smaller, unless drop_last.
        transform: a batch callable (uint8 or [0, 1] float in, normalised float out).
        shuffle: a new random order every pass (torch's global generator on the device).
        device: where the data lives and the batches are made.
        indices: each image's index in the data set as loaded (default 0..N-1), kept so that
            results can be traced back to the file (misclassified.json).
        drop_last: skip the last, smaller batch of each pass (training: a step on a handful of
            images is a noisy step; with shuffling every image is still seen). Ignored when the
            set is smaller than one batch.

    `sharded(ranks)` gives the same loader for one rank of a data-parallel run: it yields that
    rank's share of each batch (s11lib/distributed.py).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        shuffle: bool = False,
        device: torch.device | str = "cpu",
        indices: torch.Tensor | None = None,
        drop_last: bool = False,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.indices = torch.arange(len(images)) if indices is None else indices.cpu()
        self.batch_size = batch_size
        self.transform = transform
        self.shuffle = shuffle
        self.drop_last = drop_last and len(images) >= batch_size
        self.ranks = Ranks()

    def sharded(self, ranks: Ranks) -> "DeviceLoader":
        """This loader for one rank: the same batches, order and augmentation draws on every rank,
        each rank yielding only its contiguous share of each batch (`Ranks.part`). The images are
        shared with this loader, not copied.

        Every rank keeps the whole split on its device and draws the shuffle and, when the transform
        has `sample` and `apply` (TrainTransform), the parameters of the whole batch from the same
        generators; it then keeps its share. A rank whose share of a small last batch is empty skips
        that batch (evaluation only: a training batch splits evenly, see s11lib/distributed.py).
        """
        shard = copy.copy(self)
        shard.ranks = ranks
        return shard

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.images) // self.batch_size
        return -(-len(self.images) // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = torch.randperm(n, device=self.device) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            whole = min(self.batch_size, n - start)
            part = self.ranks.part(whole)
            if part.start == part.stop:
                continue
            mine = slice(start + part.start, start + part.stop)
            if order is None:
                x, y = self.images[mine], self.labels[mine]
            else:
                idx = order[mine]
                x, y = self.images[idx], self.labels[idx]
            if len(x) < whole and hasattr(self.transform, "sample"):
                yield self.transform.apply(x, self.transform.sample(x, count=whole)[part]), y
            else:
                yield self.transform(x), y


@dataclass
class Loaders:
    """The three splits of a run. `val` is None when no images are held out."""

    train: DeviceLoader
    val: DeviceLoader | None
    test: DeviceLoader


def build_loaders(
    data_dir: str | os.PathLike,
    batch_size: int,
    device: torch.device | str,
    train_transform: Callable,
    test_transform: Callable,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    val_size: int = 0,
    eval_batch_size: int | None = None,
) -> Loaders:
    """Read CIFAR-10 and make the train, validation and test loaders of a run.

    `train_subset` and `test_subset` keep the first N images of their split (quick runs and
    tests); `val_size` images of the (subset) training set are then held out, unaugmented, for
    the scheduler and the choice of the best checkpoint.
    """
    train_x, train_y = load_cifar10(data_dir, train=True, download=download)
    test_x, test_y = load_cifar10(data_dir, train=False, download=False)
    for name, subset, n in (("train_subset", train_subset, len(train_x)), ("test_subset", test_subset, len(test_x))):
        if subset is not None and not 1 <= subset <= n:
            raise ValueError(f"{name} must be between 1 and {n} (the size of the split), got {subset}")
    if train_subset is not None:
        train_x, train_y = train_x[:train_subset], train_y[:train_subset]
    if test_subset is not None:
        test_x, test_y = test_x[:test_subset], test_y[:test_subset]
    if not 0 <= val_size < len(train_x):
        raise ValueError(val_size_error(val_size, len(train_x), f"the {len(train_x)} training images"))
    eval_batch_size = eval_batch_size or batch_size
    train_idx, val_idx = split_indices(len(train_x), val_size)
    train = DeviceLoader(train_x[train_idx], train_y[train_idx], batch_size, train_transform, True, device, train_idx,
                         drop_last=True)
    val = None
    if val_size:
        val = DeviceLoader(train_x[val_idx], train_y[val_idx], eval_batch_size, test_transform, False, device, val_idx)
    test = DeviceLoader(test_x, test_y, eval_batch_size, test_transform, False, device)
    return Loaders(train, val, test)
