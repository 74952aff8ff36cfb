"""The CUDA path, where there is a GPU: the precision chosen for it, two epochs that train, a resume,
and no host sync per step (CUDA's sync debug mode). Skipped, with the reason, on a machine without
one; everything here also runs on the CPU in the other test files (fp16 + GradScaler, fused SGD,
compile, channels_last), with bit-equality only there.
"""
import pytest
import torch
from torch import nn

from s11lib.config import Config
from s11lib.device import auto_precision, resolve_precision
from s11lib.loaders import DeviceLoader
from s11lib.models import resnet18
from s11lib.optim import make_optimizer
from s11lib.run import OUTPUT_FILES, run
from s11lib.transforms import test_transforms, train_transforms
from s11lib.utils.train_test import evaluate, train_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
CUDA = torch.device("cuda")


def test_auto_picks_the_precision_of_this_gpu():
    capability = torch.cuda.get_device_capability(CUDA)
    precision = resolve_precision("auto", CUDA)
    assert precision == auto_precision(capability)
    assert precision.dtype == (torch.bfloat16 if capability >= (8, 0) else
                               torch.float16 if capability >= (7, 0) else None)


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_two_epochs_train_and_the_run_resumes(data_dir, tmp_path, amp):
    config = dict(data_dir=str(data_dir), out_dir=str(tmp_path), download=False, device="cuda", amp=amp, width=16,
                  batch_size=64, train_subset=2048, val_size=256, test_subset=512, progress=False,
                  num_misclassified=5)
    first = run(Config(**config, epochs=2))
    assert first.rows[-1]["train_loss"] < first.rows[0]["train_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUT_FILES)
    resumed = run(Config(**config, epochs=3))
    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3] and resumed.rows[:2] == first.rows
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert len(last["rng"]["cuda"]) == 1  # the run device's generator only
    assert bool(last["scaler"]) == (resolve_precision(amp, CUDA).scaled)


def _syncs(batches: int, amp: str, host_syncs) -> int:
    precision = resolve_precision(amp, CUDA)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64 * batches, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64 * batches,), generator=g)
    model = resnet18(width=16).to(CUDA)
    optimizer = make_optimizer(model, Config(batch_size=64), CUDA)
    scaler = precision.grad_scaler(CUDA)
    train = DeviceLoader(images, labels, 64, train_transforms(), shuffle=True, device=CUDA)
    test = DeviceLoader(images, labels, 64, test_transforms(), device=CUDA)
    train_epoch(model, train, optimizer, nn.CrossEntropyLoss(), 1, CUDA, precision.dtype, progress=False,
                scaler=scaler)  # warm-up: constants, cuDNN, the scaler's tensors
    torch.cuda.synchronize()

    def epoch():
        train_epoch(model, train, optimizer, nn.CrossEntropyLoss(), 2, CUDA, precision.dtype, progress=False,
                    scaler=scaler)
        evaluate(model, test, nn.CrossEntropyLoss(), CUDA, precision.dtype)
    return host_syncs(CUDA, epoch)  # CUDA's sync debug mode


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_no_host_sync_per_step(amp, host_syncs):
    assert _syncs(2, amp, host_syncs) == _syncs(6, amp, host_syncs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="data-parallel over nccl needs 2 CUDA GPUs")
def test_two_gpus_over_nccl_train_the_model_of_one(data_dir, tmp_path):
    from test_distributed import SETTINGS, _launch_run

    settings = {**SETTINGS, "device": "cuda", "amp": "off"}  # fp32: the two sides differ only in rounding
    proc = _launch_run(data_dir, tmp_path / "two", **settings)
    assert "data-parallel: 2 processes (nccl)" in proc.stdout
    run(Config(**{**settings, "data_dir": str(data_dir), "out_dir": str(tmp_path / "one")}))
    two, one = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("two", "one"))
    for key, weight in one["model"].items():  # cuDNN picks its own algorithms: a looser bound than the CPU's
        torch.testing.assert_close(two["model"][key], weight, rtol=0, atol=1e-3, msg=key)
