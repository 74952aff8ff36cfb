"""`compile` and `channels_last` on the CPU, as a GPU runs them: compiled steps match eager ones,
checkpoints keep the plain module's keys, Grad-CAM runs on the eager module, evaluation's odd last
batch does not recompile every epoch, and an fp16 + compile + channels_last run killed mid-epoch
resumes through the CLI and writes every file.

Inductor compiles C++ on the CPU: without a C++ compiler these tests are skipped, with the reason.
The first compile of a process takes ~30 s on 2 cores (inductor caches its kernels on disk after).
"""
import copy
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import s11lib.run as run_module
from s11lib.config import Config
from s11lib.loaders import DeviceLoader
from s11lib.models import resnet18
from s11lib.optim import make_optimizer
from s11lib.run import OUTPUT_FILES, read_metrics, run
from s11lib.transforms import test_transforms
from s11lib.utils.train_test import train_epoch

from test_resume import SETTINGS, _run_child

pytestmark = [pytest.mark.slow,  # cold, inductor's C++ builds take minutes on 2 cores
              pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                 reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++)")]
CPU = torch.device("cpu")


# How far compiled steps honestly drift from eager ones on the CPU (bench/compile_drift.py, width 16,
# batch 16, 3 steps, seeds 0-2, 1 and 2 threads, AVX-512 and AVX2 kernels; 2 CPU cores, Intel Xeon,
# torch 2.14.1+cu130, 2026-12-01): losses 1.1e-7 relative at most, parameters 3.0e-8 absolute. The
# tolerances sit 100x above that. The 1.6e-4 that once failed here at width 4 was no drift: inductor
# had made the convolutions NHWC, where oneDNN#6035 computes wrong weight gradients (test_onednn.py).
DRIFT = dict(rtol=1e-5, atol=1e-6)


def test_compiled_training_steps_match_eager():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (48,), generator=g)
    torch.manual_seed(0)
    eager = resnet18(width=16)  # not narrower: see DRIFT
    compiled = copy.deepcopy(eager)
    config = Config(optimizer="sgd", lr=0.2, batch_size=16)  # DRIFT was measured on SGD's steps
    losses = {}
    for name, model, step_model in (("eager", eager, eager), ("compiled", compiled, torch.compile(compiled))):
        result = train_epoch(step_model, DeviceLoader(images, labels, 16, test_transforms()),
                             make_optimizer(model, config, CPU), nn.CrossEntropyLoss(), 1, CPU, progress=False)
        losses[name] = result.step_losses
    torch.testing.assert_close(losses["compiled"], losses["eager"], **DRIFT)
    moved = False
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, **DRIFT, msg=name)
        moved |= not torch.equal(p, resnet18(width=16).state_dict()[name])
    assert moved
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefix


@pytest.fixture(scope="module")
def killed_and_resumed(data_dir, tmp_path_factory):
    """An fp16, compiled, channels_last run killed mid-epoch 2 in a child process, then resumed by
    the CLI in this one; records the number of compiled graphs after each evaluation pass."""
    out_dir = tmp_path_factory.mktemp("compiled")
    # 48 training images (3 steps an epoch), 40 validation and 50 test at batch 16: both end on an
    # odd batch (8 and 2 images). Width 16: narrower, channels_last on the CPU falls back to contiguous
    # (s11lib/device.py). Small batches: an fp16 convolution is slow on the CPU (3 s a step at batch 16).
    options = dict(device="cpu", amp="fp16", compile=True, channels_last=True, width=16, batch_size=16,
                   train_subset=88, val_size=40, test_subset=50)
    killed = _run_child(data_dir, out_dir, "--kill-after-step", "4", killed=True, **options)  # in epoch 2

    from torch._dynamo.utils import counters
    graphs = []
    real_evaluate = run_module.evaluate

    def counting_evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return result

    config = {**SETTINGS, **options, "data_dir": str(data_dir), "out_dir": str(out_dir)}
    mp = pytest.MonkeyPatch()
    mp.setattr(run_module, "evaluate", counting_evaluate)
    try:
        code = run_module.main([f"--{k.replace('_', '-')}={v}" for k, v in config.items()])
    finally:
        mp.undo()
    return out_dir, killed, code, graphs


def test_a_compiled_fp16_run_resumes_after_a_kill(killed_and_resumed, capsys):
    out_dir, killed, code, _ = killed_and_resumed
    assert "precision: fp16 with loss scaling (amp='fp16'); compile: True, channels_last: True" in killed.stdout
    assert "note: " not in killed.stdout  # width 16: nothing fell back
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUT_FILES)
    assert [r["epoch"] for r in read_metrics(out_dir / "metrics.csv")] == [1, 2, 3]
    last = torch.load(out_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["scaler"]["scale"] > 0  # the loss scale is saved
    assert list(last["model"]) == list(resnet18(width=16).state_dict())  # plain keys: no "_orig_mod."
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    heatmaps = np.load(out_dir / "gradcam.npz")["heatmaps"]
    assert heatmaps.shape == (5, 32, 32) and 0 <= heatmaps.min() and heatmaps.max() <= 1


def test_evaluation_does_not_recompile_every_epoch(killed_and_resumed):
    # Validation and test end on odd batches here, as the shipped run's do (5,000 and 10,000 images
    # at batch 512: 392 and 272). The first epoch compiles them; later epochs compile nothing.
    # Evaluations: validation and test in epochs 2 and 3 (compiled), then best.pt's test pass (eager).
    *_, graphs = killed_and_resumed
    assert len(graphs) == 5 and graphs[1] == graphs[3] == graphs[4] > 0, graphs
