"""Data-parallel runs through torchrun train the model of one process, on the CPU over gloo.

The launches are real torchrun child processes (`python -m torch.distributed.run`) on a narrow
model and a real subset: 2 ranks equal 1 process within float rounding; a 2-rank run SIGKILLed
mid-epoch and started again ends bit for bit where an uninterrupted one ends; two "machines" (two
launches with `--nnodes 2` meeting at a c10d rendezvous on 127.0.0.1) equal the 2-rank run bit for
bit; a bad launch is one line. The pieces are tested in-process: the ranks from the environment,
each rank's share of a batch, the device of a rank.
"""
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch

import s11lib.run as run_module
from s11lib.config import Config
from s11lib.distributed import Ranks, launch, on_main, rank_device
from s11lib.loaders import FOLDER, DeviceLoader
from s11lib.run import read_metrics, run
from s11lib.transforms import test_transforms, train_transforms
from conftest import fake_cuda, write_cifar_layout
from test_resume import CRASH, _without_seconds, assert_same_run

ROOT = Path(__file__).parents[1]
# 256 training images in global batches of 64: 4 steps an epoch, 2 epochs, 32 images per rank per
# step. No warm-up: the plateau scheduler steps on the summed metrics after both epochs and lowers
# the rate after the second (patience 0, and only a doubled val_acc would count as progress). A few
# steps only: early training at full rate amplifies rounding (after 16 steps two correct runs that
# differ only in the CPU's thread count differed by 1.6e-4, after 8 by 3e-7). On the CPU, where gloo
# runs. test_subset fits the synthetic stand-in's 200 test images.
SETTINGS = dict(device="cpu", download=False, width=8, epochs=2, batch_size=64, train_subset=384, val_size=128,
                test_subset=192, warmup_epochs=0, plateau_patience=0, plateau_threshold=1.0,
                progress=False, num_misclassified=5)


def _options(settings: dict) -> list[str]:
    return [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def _env() -> dict:
    # One thread a process, as torchrun sets it for several local processes: the same arithmetic
    # in every launch, one machine or two.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{proc.stderr[-4000:]}"
    return proc


def _launch_run(data_dir, out_dir, **overrides) -> subprocess.CompletedProcess:
    """A 2-process run of SETTINGS (with `overrides`) on one machine."""
    settings = {**SETTINGS, "data_dir": data_dir, "out_dir": out_dir, **overrides}
    return _torchrun("--standalone", "--nproc-per-node=2", "-m", "s11lib.run", *_options(settings))


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out_dir = tmp_path_factory.mktemp("two-ranks")
    return out_dir, _launch_run(data_dir, out_dir)


def test_two_ranks_train_the_model_of_one_process(two_ranks, data_dir, tmp_path):
    out_dir, proc = two_ranks
    assert "data-parallel: 2 processes (gloo), 32 of each batch of 64 images per process" in proc.stdout
    assert proc.stdout.count("best checkpoint: epoch") == 1  # rank 1 prints nothing
    single = run(Config(**{**SETTINGS, "data_dir": str(data_dir), "out_dir": str(tmp_path)}))
    two, one = (torch.load(d / "last.pt", weights_only=True) for d in (out_dir, tmp_path))
    # The same images, augmentations and gradients; only the order of additions differs (DDP
    # averages two half-batch means, one process takes the mean of the whole batch). Over these 8
    # steps that leaves 3e-7 to 6e-7 on weights of size up to ~1 (seeds 1-3, 2 CPU cores,
    # 2026-11-24); 1e-4 leaves room for another CPU's rounding. Ranks that drew their own
    # augmentations were off by more than 1e-2 (tried by hand).
    for key, weight in one["model"].items():
        torch.testing.assert_close(two["model"][key], weight, rtol=0, atol=1e-4, msg=key)
    torch.manual_seed(SETTINGS.get("seed", 1))  # the run's first draws: its initial weights
    start = run_module.resnet18(10, width=SETTINGS["width"]).state_dict()
    # It trained: Adam moves a weight by about lr (1e-3) a step at most, 12 steps here.
    assert (one["model"]["linear.weight"] - start["linear.weight"]).abs().max() > 5e-3
    # The metrics: summed over the ranks, so the plateau scheduler saw the one-process values and
    # lowered the rate where one process lowers it.
    rows_two, rows_one = (_without_seconds(read_metrics(d / "metrics.csv")) for d in (out_dir, tmp_path))
    assert [r["lr"] for r in rows_two] == [r["lr"] for r in rows_one]
    lowered = [group["lr"] for group in one["optimizer"]["param_groups"]]
    assert lowered == [group["lr"] for group in two["optimizer"]["param_groups"]] and max(lowered) < rows_one[-1]["lr"]
    assert two["scheduler"]["best"] == pytest.approx(one["scheduler"]["best"], abs=1e-9)
    for two_row, one_row in zip(rows_two, rows_one, strict=True):
        for key, value in one_row.items():
            if key.endswith("_acc"):  # within one image of the smallest split (128): argmax may flip on a tie
                assert two_row[key] == pytest.approx(value, abs=100 / 128 + 1e-9), key
            elif value is not None:
                assert two_row[key] == pytest.approx(value, abs=1e-4), key
    # Rank 0 explained the mistakes of its best.pt, as one process does.
    assert json.loads((out_dir / "misclassified.json").read_text())["epoch"] == single.best_epoch


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_bit_for_bit(two_ranks, data_dir, tmp_path):
    config = json.dumps({**SETTINGS, "data_dir": str(data_dir), "out_dir": str(tmp_path)})
    crash = ["--standalone", "--nproc-per-node=2", str(CRASH), "run", config]
    # Every rank SIGKILLs itself after its 6th step, mid-epoch 2; torchrun reports the failure.
    _torchrun(*crash, "--kill-after-step", "6", expect=1)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    again = _torchrun(*crash)
    assert f"resuming from {tmp_path / 'last.pt'}: 1 of 2 epochs done" in again.stdout
    assert_same_run(two_ranks[0], tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_meet_at_a_rendezvous_and_train_the_same_run(two_ranks, data_dir, tmp_path):
    settings = {**SETTINGS, "data_dir": data_dir, "out_dir": tmp_path}
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=s11-test",
            "-m", "s11lib.run", *_options(settings)]
    nodes = [subprocess.Popen(node, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(err for _, err in outputs)
    # Whichever launch got rank 0 printed the run; the other printed nothing of it.
    assert sorted("best checkpoint" in out for out, _ in outputs) == [False, True]
    assert_same_run(two_ranks[0], tmp_path)  # world size 2 either way: the same arithmetic


def test_a_bad_launch_is_one_line(data_dir, tmp_path):
    settings = {**SETTINGS, "data_dir": data_dir, "out_dir": tmp_path / "run", "batch_size": 63}
    proc = _torchrun("--standalone", "--nproc-per-node=2", "-m", "s11lib.run", *_options(settings), expect=1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: batch_size=63 does not split evenly over the 2 processes of this torchrun launch; "
                      "pass a multiple of 2 (it is the global batch)"]
    assert not (tmp_path / "run").exists()


def test_each_machine_downloads_the_data_once(tmp_path):
    source = write_cifar_layout(tmp_path / "source", train_per_batch=20, test_size=20)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / FOLDER, arcname=FOLDER)
    archive, requests = buffer.getvalue(), []

    class Archive(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    # The ranks' s11lib fetches from this server: a script that points the loader at it, then runs the CLI.
    child = tmp_path / "child.py"
    child.write_text(f"import sys\nimport s11lib.loaders as loaders\nloaders.URL = 'http://127.0.0.1:{httpd.server_port}/a.tgz'\n"
                     f"loaders.ARCHIVE_MD5 = {hashlib.md5(archive).hexdigest()!r}\n"
                     "from s11lib.run import main\nsys.exit(main())\n")
    settings = {**SETTINGS, "data_dir": tmp_path / "data", "out_dir": tmp_path / "run", "download": True,
                "epochs": 1, "batch_size": 20, "train_subset": None, "val_size": 20, "test_subset": None}
    try:
        _torchrun("--standalone", "--nproc-per-node=2", str(child), *_options(settings))
    finally:
        httpd.shutdown()
    assert requests == ["/a.tgz"]  # local rank 0 fetched it; rank 1 waited, then read the folder
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [FOLDER]


def test_ranks_come_from_torchrun_s_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0, 1) and not Ranks().distributed
    ranks = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert ranks == Ranks(3, 4, 1, 2) and ranks.distributed and not ranks.is_main
    with pytest.raises(ValueError, match=r"needs the integers RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE .*"
                                         r"LOCAL_RANK=None.*launch with torchrun"):
        Ranks.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="inconsistent torchrun environment: RANK=2, WORLD_SIZE=2"):
        Ranks.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("length", [0, 1, 5, 64])
def test_the_shares_of_a_batch_cover_it_once(world, length):
    parts = [Ranks(rank, world, rank, world).part(length) for rank in range(world)]
    assert [i for part in parts for i in range(length)[part]] == list(range(length))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def _batches(loader, seed):
    torch.manual_seed(seed)
    return list(loader)


def test_the_ranks_together_see_the_batches_of_one_process():
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(70) % 10
    # Training: shuffled, augmented, in batches of 16 (4 of them; the last 6 images dropped).
    train = DeviceLoader(images, labels, 16, train_transforms(), shuffle=True, drop_last=True)
    whole = _batches(train, seed=5)
    shares = [_batches(train.sharded(Ranks(rank, 2, rank, 2)), seed=5) for rank in range(2)]
    assert len(whole) == 4 and [len(s) for s in shares] == [4, 4]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shares):
        assert len(x0) == len(x1) == 8
        # The same images with the same crops, angles and holes: the draws are of the whole batch.
        torch.testing.assert_close(torch.cat([x0, x1]), x, rtol=0, atol=1e-6)
        assert torch.equal(torch.cat([y0, y1]), y)
    # Without the whole batch's draws the shares would differ from it: the check can fail.
    x0_alone = train_transforms()(images[:8], torch.Generator().manual_seed(0))
    assert not torch.allclose(x0_alone, train_transforms()(images[:8], torch.Generator().manual_seed(1)))
    # Evaluation: in order, the last batch of 70 - 64 = 6 images split over 4 ranks as 1, 2, 1, 2;
    # a rank with an empty share of a batch skips it.
    test = DeviceLoader(images, labels, 32, test_transforms())
    for world in (2, 4, 7):
        seen = [y for rank in range(world) for _, y in test.sharded(Ranks(rank, world, rank, world))]
        assert sorted(torch.cat(seen).tolist()) == sorted(labels.tolist())
        assert all(len(y) > 0 for y in seen)


def test_a_batch_that_does_not_split_is_refused_before_any_group_starts():
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"}
    with pytest.raises(ValueError, match=r"^batch_size=64 does not split evenly over the 3 processes"):
        with launch("cpu", 64, env):
            pass
    assert not torch.distributed.is_initialized()
    with launch("cpu", 64, {}) as (ranks, device):  # no torchrun: one process, no group
        assert ranks == Ranks() and device == torch.device("cpu") and not torch.distributed.is_initialized()
        assert on_main(ranks, lambda: 7) == 7


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a machine with two A100s shows it."""
    fake_cuda(monkeypatch, 2, (8, 0), ["sm_80", "sm_90"], "NVIDIA A100-SXM4-40GB")


def test_each_rank_takes_the_gpu_of_its_local_rank(two_gpus):
    for name in ("auto", "cuda"):
        assert rank_device(name, Ranks(3, 4, 1, 2)) == torch.device("cuda", 1)
    assert rank_device("cuda:1", Ranks(3, 4, 1, 2)) == torch.device("cuda", 1)  # its own GPU, named
    assert rank_device("cpu", Ranks(3, 4, 1, 2)) == torch.device("cpu")  # gloo on the CPU
    with pytest.raises(ValueError, match=r"^torchrun started 4 processes on this machine but it has 2 CUDA GPU\(s\); "
                                         r"pass --nproc-per-node 2 or fewer"):
        rank_device("auto", Ranks(0, 4, 0, 4))
    with pytest.raises(ValueError, match=r"^device='cuda:0' names one GPU, but under torchrun each process takes "
                                         r"the GPU of its LOCAL_RANK"):
        rank_device("cuda:0", Ranks(1, 2, 1, 2))


def test_an_error_of_one_rank_alone_is_printed_with_its_rank(monkeypatch, capsys):
    monkeypatch.setattr(run_module, "QUIET_SECONDS", 0)
    monkeypatch.setenv("RANK", "1")
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert run_module._fail(ValueError("no data on this machine"), 2) == 2
    assert capsys.readouterr().err == "error (rank 1): no data on this machine\n"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_module._fail(ValueError("bad"), 2) == 2
    assert capsys.readouterr().err == "error: bad\n"

