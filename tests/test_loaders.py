"""Reading CIFAR-10: the real data (or the synthetic stand-in), the download, splits and loaders."""
import functools
import hashlib
import http.server
import io
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SYNTHETIC_TEST, SYNTHETIC_TRAIN_PER_BATCH, write_batch, write_cifar_layout
from s11lib import loaders
from s11lib.constants import MEAN, STD
from s11lib.loaders import FOLDER, DatasetError, DeviceLoader, build_loaders, load_cifar10, split_indices
from s11lib.transforms import test_transforms, train_transforms


# --- the data as read ------------------------------------------------------------------------
def test_counts_per_class(data_dir, is_real_data):
    _, train_y = load_cifar10(data_dir, train=True)
    _, test_y = load_cifar10(data_dir, train=False)
    per_train, per_test = (5000, 1000) if is_real_data else (SYNTHETIC_TRAIN_PER_BATCH // 2, SYNTHETIC_TEST // 10)
    assert torch.bincount(train_y, minlength=10).tolist() == [per_train] * 10
    assert torch.bincount(test_y, minlength=10).tolist() == [per_test] * 10


def test_shapes_dtypes_and_channel_statistics(data_dir, is_real_data):
    images, labels = load_cifar10(data_dir, train=True)
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and labels.dtype == torch.int64
    x = images.double() / 255
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    if is_real_data:
        # The constants the normalisation uses are the training set's own statistics.
        torch.testing.assert_close(mean, torch.tensor(MEAN, dtype=torch.float64), atol=5e-5, rtol=0)
        torch.testing.assert_close(std, torch.tensor(STD, dtype=torch.float64), atol=5e-5, rtol=0)
        test_mean = (load_cifar10(data_dir, train=False)[0].double() / 255).mean((0, 2, 3))
        torch.testing.assert_close(test_mean, torch.tensor([0.49421428, 0.48513139, 0.45040909], dtype=torch.float64),
                                   atol=1e-6, rtol=0)  # the published test-set figures (dataset README)
    else:
        # Against a plain numpy reading of the same files.
        raw = np.concatenate([pickle.load(open(Path(data_dir) / FOLDER / f"data_batch_{i}", "rb"),
                                          encoding="latin1")["data"] for i in range(1, 6)])
        ref = raw.reshape(-1, 3, 1024) / 255
        np.testing.assert_allclose(mean.numpy(), ref.mean((0, 2)), atol=1e-9)


def test_rows_are_rgb_planes_in_row_major_order(tmp_path):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    root = write_cifar_layout(tmp_path, train_per_batch=10, test_size=10)
    write_batch(root / FOLDER / "test_batch", data, [3, 4])
    images, labels = load_cifar10(root, train=False)
    assert images[0, 1, 0, 0] == data[0, 1024] and images[1, 2, 31, 31] == data[1, 3071]
    assert images[0, 0, 1, 0] == data[0, 32]
    assert labels.tolist() == [3, 4]


def test_data_dir_may_name_the_batches_folder_itself(data_dir):
    a = load_cifar10(data_dir, train=False)[1]
    b = load_cifar10(Path(data_dir) / FOLDER, train=False)[1]
    assert torch.equal(a, b)


# --- download (bad data sets, through run(), are in test_bad_input.py) -------------------------
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _archive_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=FOLDER)
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server (127.0.0.1) serving a CIFAR-10-like archive; yields (url, md5)."""
    source = write_cifar_layout(tmp_path / "source", train_per_batch=10, test_size=10)
    site = tmp_path / "site"
    site.mkdir()
    archive = _archive_of(source / FOLDER)
    (site / "cifar-10-python.tar.gz").write_bytes(archive)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/cifar-10-python.tar.gz", hashlib.md5(archive).hexdigest()
    httpd.shutdown()


def test_official_archive_address_and_md5():
    assert loaders.URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert loaders.ARCHIVE_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_download_fetches_checks_and_unpacks(server, tmp_path, monkeypatch):
    url, md5 = server
    monkeypatch.setattr(loaders, "URL", url)
    monkeypatch.setattr(loaders, "ARCHIVE_MD5", md5)
    root = tmp_path / "fresh"
    images, labels = load_cifar10(root, train=True, download=True)
    assert images.shape == (50, 3, 32, 32) and len(labels) == 50
    assert sorted(p.name for p in root.iterdir()) == [FOLDER]  # no archive or temp folder left


def test_a_download_that_another_process_finished_first_keeps_its_folder(server, tmp_path):
    url, md5 = server
    root = tmp_path / "shared"
    theirs = loaders.download_cifar10(root, url=url, md5=md5)
    (theirs / "theirs.txt").write_text("unpacked first")
    assert loaders.download_cifar10(root, url=url, md5=md5) == theirs  # lost the race: no error
    assert (theirs / "theirs.txt").read_text() == "unpacked first"
    assert sorted(p.name for p in root.iterdir()) == [FOLDER]  # its own copy gone with its temporary folder


def test_download_with_wrong_md5_leaves_nothing(server, tmp_path):
    url, _ = server
    root = tmp_path / "fresh"
    with pytest.raises(DatasetError, match="md5") as e:
        loaders.download_cifar10(root, url=url, md5="0" * 32)
    _one_line(e)
    assert not root.exists()  # the folder it made for the download is gone too


def test_download_offline_says_what_to_do(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "fresh" / "data"
    with pytest.raises(DatasetError, match="could not download CIFAR-10.*copy the 'cifar-10-batches-py' folder") as e:
        loaders.download_cifar10(root, url=f"http://127.0.0.1:{port}/x.tar.gz")
    assert str(root) in _one_line(e)
    assert not tmp_path.joinpath("fresh").exists()  # no empty data folder left behind, nor its parents
    # A folder that was there before stays, with what it held.
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="could not download"):
        loaders.download_cifar10(root, url=f"http://127.0.0.1:{port}/x.tar.gz")
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


# --- splits and loaders --------------------------------------------------------------------------
def test_split_is_disjoint_complete_and_fixed():
    train, val = split_indices(100, 20)
    assert len(val) == 20 and len(train) == 80
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(val, split_indices(100, 20)[1])
    torch.manual_seed(123)  # the run's seed does not move the split
    assert torch.equal(val, split_indices(100, 20)[1])


def test_build_loaders_subsets_and_indices(data_dir):
    data = build_loaders(data_dir, 32, "cpu", train_transforms(), test_transforms(),
                         train_subset=200, test_subset=50, val_size=40)
    assert data.train.num_images == 160 and data.val.num_images == 40 and data.test.num_images == 50
    all_x, all_y = load_cifar10(data_dir, train=True)
    # indices trace each image back to the file.
    assert torch.equal(data.val.images, all_x[data.val.indices])
    assert torch.equal(data.train.labels, all_y[data.train.indices])
    assert torch.equal(data.test.indices, torch.arange(50))


@pytest.mark.parametrize("kwargs, message", [({"train_subset": 10**6}, "train_subset must be between 1 and"),
                                             ({"test_subset": 10**6}, "test_subset must be between 1 and"),
                                             ({"train_subset": 50, "val_size": 50}, "val_size=50 holds out all of the 50")])
def test_impossible_subsets_are_errors(data_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_loaders(data_dir, 32, "cpu", train_transforms(), test_transforms(), **kwargs)


def test_device_loader_covers_every_image_once_per_pass():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    labels = torch.arange(10)
    loader = DeviceLoader(images, labels, 4, lambda x: x, shuffle=True)
    assert len(loader) == 3
    torch.manual_seed(0)
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)  # a new order each pass
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # images and labels stay paired
