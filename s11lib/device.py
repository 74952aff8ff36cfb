"""The machine a run uses: which device, whether the installed torch can drive it, at what precision.

Users run the notebooks on Colab's T4 (compute capability 7.5), Kaggle's P100 (6.0), A100s (8.0)
and H100s (9.0), and on the CPU. Each gets the precision its hardware is fast at (`Precision`):

* 8.0 and above: bf16 autocast. bf16 has fp32's exponent range, so no loss scaling is needed.
* 7.x (T4, V100): fp16 autocast with a GradScaler. `torch.cuda.is_bf16_supported()` says True
  on a T4, but it counts emulation: cuDNN has no bf16 convolutions below 8.0, and bf16 there
  runs slower than fp32 (pytorch PR #148322), while fp16 uses the tensor cores.
* below 7.0 and the CPU: fp32. No tensor cores to feed; on a CPU without AMX, bf16 and fp16
  convolutions are slower than fp32.

`amp="bf16"`, `"fp16"` and `"off"` force a choice, on any device: CPU autocast does both dtypes,
so the CPU tests run the fp16 + GradScaler path that a T4 runs.

**fp32 is IEEE fp32.** torch lets cuDNN run fp32 convolutions as TF32 (a 10-bit mantissa) by
default on 8.0 and above, so an fp32 run there would not be what its log says. Every run sets
TF32 itself (`Precision.apply`): off, except with `amp="tf32"`, which asks for it by name (CUDA
8.0 and above only).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

AMPS = ("auto", "bf16", "fp16", "tf32", "off")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": None, "off": None}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; an unavailable or unusable device is a one-line error."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but this machine has no CUDA GPU; use device='auto' or 'cpu'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "cuda":
        check_arch(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list(),
                   torch.cuda.get_device_name(device))
    return device


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for `arch_list` (torch.cuda.get_arch_list(), e.g. ['sm_75', 'sm_80',
    'compute_90']) has kernels for a GPU of this compute capability.

    A cubin built for sm_XY runs on X.Y and on later minor versions of the same major (sm_80 on
    8.6); PTX (compute_XY) is compiled by the driver for X.Y and anything newer.
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def check_arch(capability: tuple[int, int], arch_list: list[str], name: str = "this GPU") -> None:
    """A one-line ValueError for a GPU the installed torch has no kernels for: it passes
    cuda.is_available() and would crash at the first kernel with 'no kernel image is available'."""
    if arch_list and not arch_supported(capability, arch_list):
        major, minor = capability
        raise ValueError(f"{name} (compute capability {major}.{minor}) is not supported by torch "
                         f"{torch.__version__}, which was built for {' '.join(arch_list)}; install a torch "
                         "built for it (an older release or another CUDA build) or use device='cpu'")


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None: fp32), whether it needs loss scaling, and why it was chosen."""

    dtype: torch.dtype | None
    reason: str
    tf32: bool = False  # fp32 convolutions and matmuls as TF32 (CUDA 8.0+): only when asked by name

    @property
    def name(self) -> str:
        return "tf32" if self.tf32 else {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def apply(self, device: torch.device) -> None:
        """Set torch's TF32 switches for this precision (process-wide; they matter on CUDA only)."""
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    @property
    def scaled(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.dtype == torch.float16

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler for the device, enabled only for fp16 (disabled, it passes everything through)."""
        return torch.amp.GradScaler(device.type, enabled=self.scaled)

    def __str__(self) -> str:
        return f"{self.name}{' with loss scaling' if self.scaled else ''} ({self.reason})"


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """The precision of `amp` ("auto", "bf16", "fp16" or "off") on `device`; see the module docstring."""
    if amp not in AMPS:
        raise ValueError(f"amp must be one of {AMPS}, got {amp!r}")
    if amp == "tf32":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability[0] < 8:
            where = "the CPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
            raise ValueError(f"amp='tf32' needs a CUDA GPU of compute capability 8.0 or above (TF32 tensor cores), "
                             f"not {where}; use amp='off' for fp32")
        return Precision(None, "amp='tf32': fp32 tensors, TF32 convolutions and matmuls", tf32=True)
    if amp != "auto":
        return Precision(DTYPES[amp], f"amp={amp!r}")
    if device.type != "cuda":
        return Precision(None, f"amp='auto' on the {device.type.upper()}: autocast there is slower than fp32")
    return auto_precision(torch.cuda.get_device_capability(device))


def auto_precision(capability: tuple[int, int]) -> Precision:
    """amp='auto' on a CUDA GPU of this compute capability."""
    major, minor = capability
    cc = f"compute capability {major}.{minor}"
    if major >= 8:
        return Precision(torch.bfloat16, f"amp='auto', {cc}: bf16 tensor cores")
    if major == 7:
        return Precision(torch.float16, f"amp='auto', {cc}: fp16 tensor cores, no bf16 convolutions below 8.0")
    return Precision(None, f"amp='auto', {cc}: no tensor cores below 7.0")


# oneDNN's jit_1x1 convolution, backward by weights, with a stride above 1 and an NHWC source first
# copies the source to unit stride ("rtus") into a workspace sized for the real input channels, but
# writes whole channel blocks (8 floats on AVX2, 16 on AVX-512): with fewer input channels than a
# block it writes past the workspace (uxlfoundation/oneDNN#6035, open). Seen here with torch
# 2.14.1 (oneDNN 3.12): hangs with 2 threads (the overflow lands on the kernel's own barrier),
# segfaults with 1, or silently wrong weight gradients (tests/test_onednn.py). ResNet18's shortcuts
# are such convolutions, with width, 2 x width and 4 x width input channels: width < 16 meets it.
# Where it was found: resnet18(width=4), layer2.0.shortcut.0 = Conv2d(4, 8, 1, stride=2) on a batch
# of (16, 4, 32, 32), its weight gradient in the second step (jit_1x1:avx2 backward_weights).
# Contiguous (NCHW) tensors take another kernel and are safe.
ONEDNN_NHWC_MIN_CHANNELS = 16  # the widest block (AVX-512); AVX2's is 8


def onednn_nhwc_hazards(model: torch.nn.Module) -> list[str]:
    """The convolutions of `model` whose weight gradient oneDNN#6035 breaks on the CPU in NHWC:
    1x1, a stride above 1, fewer than ONEDNN_NHWC_MIN_CHANNELS input channels per group."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels // m.groups < ONEDNN_NHWC_MIN_CHANNELS]


@dataclass(frozen=True)
class CpuLayout:
    """What a run on this device may do with the memory layout, and why (see onednn_nhwc_hazards)."""

    channels_last: bool  # the layout the run uses
    # torch.compile: inductor's layout optimisation turns convolutions NHWC by itself, on the CPU too;
    # False keeps them as they come.
    inductor_layout_optimization: bool
    note: str  # "" when nothing was changed

    @property
    def memory_format(self) -> torch.memory_format:
        """What `model.to(memory_format=...)` takes for this layout."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def compile_options(self) -> dict:
        """torch._inductor.config settings for the run's compiles (empty when none are needed)."""
        return {} if self.inductor_layout_optimization else {"layout_optimization": False}


def safe_layout(model: torch.nn.Module, device: torch.device, channels_last: bool, compile: bool) -> CpuLayout:
    """The layout a run of `model` on `device` can use without meeting oneDNN#6035: on the CPU,
    with a convolution it breaks, channels_last falls back to contiguous and compiled code keeps
    the contiguous layout. Elsewhere (CUDA: cuDNN) everything is as asked."""
    hazards = onednn_nhwc_hazards(model) if device.type == "cpu" and (channels_last or compile) else []
    if not hazards:
        return CpuLayout(channels_last, True, "")
    changed = []
    if channels_last:
        changed.append("channels_last off (contiguous instead)")
    if compile:
        changed.append("compiled with inductor's layout optimisation off")
    note = (f"{' and '.join(changed)}: oneDNN on the CPU hangs or computes wrong weight gradients for 1x1 "
            f"stride-2 convolutions in NHWC with under {ONEDNN_NHWC_MIN_CHANNELS} input channels "
            f"({', '.join(hazards)}; uxlfoundation/oneDNN#6035); width >= {ONEDNN_NHWC_MIN_CHANNELS} avoids it")
    return CpuLayout(False, False, note)


_NO_CUDA_RUNTIME = "No CUDA runtime is found"


class _NoCudaRuntimeNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_CUDA_RUNTIME)


def quiet_cuda_home_note() -> None:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." line, and only that one.

    torch.compile imports torch.utils.cpp_extension, which logs it on any machine that has a CUDA
    toolkit and no usable GPU (a Colab CPU runtime, our CI): PyPI's torch is a CUDA build. For a
    run on the CPU it says nothing, and users read it as an error. Idempotent."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())
