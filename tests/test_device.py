"""Each GPU generation gets its precision, a GPU the installed torch cannot drive is refused in one
line before anything is written, and the explicit precisions run on the CPU as they would on a GPU."""
import pytest
import torch

from conftest import fake_cuda
from s11lib.config import Config
from s11lib.device import arch_supported, auto_precision, check_arch, resolve_device, resolve_precision
from s11lib.run import run

CPU = torch.device("cpu")
# torch 2.9's CUDA 12.8 wheel (torch.cuda.get_arch_list()): no sm_60 or sm_70 kernels, no PTX below 12.0.
RECENT_WHEEL = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("capability, name, dtype", [
    ((6, 0), "fp32", None),  # P100: no tensor cores
    ((7, 0), "fp16", torch.float16),  # V100
    ((7, 5), "fp16", torch.float16),  # T4: bf16 is emulated there, slower than fp32
    ((8, 0), "bf16", torch.bfloat16),  # A100
    ((8, 9), "bf16", torch.bfloat16),  # L4
    ((9, 0), "bf16", torch.bfloat16),  # H100
])
def test_auto_precision_follows_the_compute_capability(capability, name, dtype):
    precision = auto_precision(capability)
    assert precision.name == name and precision.dtype == dtype
    assert precision.scaled == (dtype == torch.float16)  # only fp16 needs loss scaling
    assert f"compute capability {capability[0]}.{capability[1]}" in str(precision)


def test_auto_is_fp32_on_the_cpu_and_explicit_values_hold_anywhere():
    assert resolve_precision("auto", CPU).dtype is None
    assert str(resolve_precision("auto", CPU)).startswith("fp32 (amp='auto' on the CPU")
    assert resolve_precision("off", CPU).dtype is None
    assert resolve_precision("bf16", CPU).dtype == torch.bfloat16 and not resolve_precision("bf16", CPU).scaled
    fp16 = resolve_precision("fp16", CPU)
    assert fp16.dtype == torch.float16 and fp16.scaled and fp16.grad_scaler(CPU).is_enabled()
    assert not resolve_precision("bf16", CPU).grad_scaler(CPU).is_enabled()
    with pytest.raises(ValueError, match=r"amp must be one of \('auto', 'bf16', 'fp16', 'tf32', 'off'\), got 'fp32'"):
        resolve_precision("fp32", CPU)


def test_fp32_is_ieee_fp32_and_tf32_is_asked_for_by_name(monkeypatch):
    # torch runs cuDNN's fp32 convolutions as TF32 by default on 8.0+: a run sets the switches itself.
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as torch may start
        for amp in ("off", "bf16", "fp16"):
            precision = resolve_precision(amp, cuda)
            assert not precision.tf32 and precision.name != "tf32"
            precision.apply(cuda)
            assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        tf32 = resolve_precision("tf32", cuda)
        assert tf32.name == "tf32" and tf32.dtype is None and not tf32.scaled and "TF32" in str(tf32)
        tf32.apply(cuda)
        assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cuda.matmul.allow_tf32 is True
        resolve_precision("off", CPU).apply(CPU)  # the CPU has no TF32: nothing changes there
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match=r"^amp='tf32' needs a CUDA GPU of compute capability 8.0 or above "
                                         r"\(TF32 tensor cores\), not compute capability 7.5; use amp='off'"):
        resolve_precision("tf32", cuda)
    with pytest.raises(ValueError, match="not the CPU"):
        resolve_precision("tf32", CPU)


@pytest.mark.parametrize("capability, arch_list, supported", [
    ((6, 0), RECENT_WHEEL, False),  # Kaggle's P100 with a recent wheel: "no kernel image is available"
    ((7, 0), RECENT_WHEEL, False),  # V100
    ((7, 5), RECENT_WHEEL, True),  # T4
    ((8, 6), ["sm_80"], True),  # a cubin runs on later minor versions of its major
    ((8, 0), ["sm_86"], False),  # ...not on earlier ones
    ((9, 0), ["sm_80", "sm_86"], False),  # nor on another major
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX is compiled by the driver for newer GPUs
    ((12, 0), RECENT_WHEEL, True),
])
def test_arch_support(capability, arch_list, supported):
    assert arch_supported(capability, arch_list) is supported


def test_an_unsupported_gpu_is_a_one_line_error():
    with pytest.raises(ValueError) as e:
        check_arch((6, 0), RECENT_WHEEL, "Tesla P100-PCIE-16GB")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("Tesla P100-PCIE-16GB (compute capability 6.0) is not supported by torch ")
    assert "sm_75" in message and "device='cpu'" in message
    check_arch((6, 0), [], "a build that reports no architectures")  # nothing to check against


@pytest.fixture
def p100(monkeypatch):
    """torch.cuda as a recent wheel sees Kaggle's P100."""
    fake_cuda(monkeypatch, 1, (6, 0), RECENT_WHEEL, "Tesla P100-PCIE-16GB")


@pytest.mark.parametrize("name", ["auto", "cuda", "cuda:0"])
def test_a_run_on_an_unsupported_gpu_stops_before_writing(p100, name, small_data, tmp_path):
    with pytest.raises(ValueError, match=r"^Tesla P100-PCIE-16GB \(compute capability 6.0\) is not supported"):
        resolve_device(name)
    out_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="is not supported by torch"):
        run(Config(data_dir=str(small_data), out_dir=str(out_dir), download=False, device=name, width=4, epochs=1,
                   val_size=0, progress=False))
    assert not out_dir.exists()


_IMPORT_CPP_EXTENSION = """
import sys
import torch
assert "torch.utils.cpp_extension" not in sys.modules
if sys.argv[1] == "quiet":
    from s11lib.device import quiet_cuda_home_note
    quiet_cuda_home_note()
    quiet_cuda_home_note()  # twice: one filter
import logging
import torch.utils.cpp_extension  # what torch.compile imports; it logs the line as it is imported
logging.getLogger("torch.utils.cpp_extension").warning("another warning stays")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the line is only logged where no CUDA runtime is usable")
@pytest.mark.parametrize("quiet", [False, True])
def test_the_no_cuda_runtime_line_is_dropped_and_only_it(quiet, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CUDA_HOME": str(tmp_path)}  # a toolkit found: what makes torch log the line
    done = subprocess.run([sys.executable, "-c", _IMPORT_CPP_EXTENSION, "quiet" if quiet else "loud"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("No CUDA runtime is found" in done.stderr) is not quiet
    assert "another warning stays" in done.stderr
