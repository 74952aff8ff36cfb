"""One command that measures a GPU for s11lib and writes what it found, as markdown and CSV.

    PYTHONPATH=. python bench/gpu_report.py OUT_DIR --data-dir DATA_DIR        # ~5-8 min on an H100
    PYTHONPATH=. python bench/gpu_report.py OUT_DIR --data-dir DATA_DIR --tiny --device cpu   # a smoke test

Needs only torch, torchvision, numpy, matplotlib and tqdm (what the GPU machines have) and the
s11lib folder. OUT_DIR/gpu_report.md and OUT_DIR/gpu_report.csv get:

* the machine: GPU, compute capability, torch, CUDA and cuDNN versions, and the precision
  amp="auto" picks there (s11lib/device.py);
* the training step at batch 512, full-width ResNet18, for {fp32, bf16, fp16} x {contiguous,
  channels_last} x {eager, compiled}: milliseconds per step (the median of the timed steps, after
  warm-up) and, for compiled ones, the compile time apart;
* host syncs per step (CUDA's sync debug mode; on the CPU, host reads counted at the dispatcher);
* the share of GroupNorm (forward and backward) in the device time of a profiled step;
* the time to write last.pt (atomically, fsync'd), as every epoch does;
* one epoch (train + test) of the standard pipeline (bench/pipelines.py) against s11lib's, as a ratio.

Each step is s11lib's own: its batched augmentations on the device, s11lib.utils.train_test's
train_epoch, the fused SGD and the GradScaler a run would use. docs/benchmarks.md holds the results.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from s11lib import checkpoint
from s11lib.config import Config
from s11lib.device import ONEDNN_NHWC_MIN_CHANNELS, onednn_nhwc_hazards, resolve_device, resolve_precision
from s11lib.loaders import DeviceLoader
from s11lib.models import resnet18
from s11lib.optim import make_optimizer, make_scheduler
from s11lib.transforms import train_transforms
from s11lib.utils.train_test import train_epoch

import pipelines  # bench/pipelines.py, the standard pipeline and s11lib's: bench/ is sys.path[0] for a script

PRECISIONS = ("off", "tf32", "bf16", "fp16")  # tf32: measured only on CUDA 8.0 and above
LAYOUTS = ("contiguous", "channels_last")
MODES = ("eager", "compiled")
CSV_COLUMNS = ("precision", "layout", "mode", "step_ms", "images_per_s", "compile_s", "syncs_per_step")


sync = pipelines.sync


class HostReads(TorchDispatchMode):
    """Ops that make the host wait on the device: value reads (`.item()`, `bool(t)`) and tensors
    built from Python data (a pageable copy to the device). The CPU stand-in for CUDA's sync debug mode."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith(("aten._local_scalar_dense", "aten.lift_fresh"))
        return func(*args, **(kwargs or {}))


def host_syncs(device: torch.device, work: Callable[[], object]) -> int:
    """How many times `work()` makes the host wait for the device: CUDA's sync debug mode on a
    GPU, HostReads elsewhere. tests/test_train.py and tests/test_gpu.py count with it too."""
    if device.type != "cuda":
        with HostReads() as mode:
            work()
        return mode.count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class Bench:
    """A model, optimizer and scaler in one configuration, with a synthetic uint8 batch set on the device."""

    def __init__(self, args, device: torch.device, amp: str, layout: str, mode: str):
        torch.manual_seed(0)
        self.device, self.args = device, args
        self.precision = resolve_precision(amp, device)
        self.precision.apply(device)  # fp32 rows are IEEE fp32, the tf32 row TF32
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.model = resnet18(width=args.width).to(device, memory_format=fmt)
        config = Config(batch_size=args.batch_size, lr=0.05)  # a small rate: the timing must not diverge
        self.optimizer = make_optimizer(self.model, config, device)
        self.scaler = self.precision.grad_scaler(device)
        self.step_model = torch.compile(self.model, backend=args.compile_backend) if mode == "compiled" \
            else self.model
        g = torch.Generator().manual_seed(0)
        n = args.batch_size * args.steps
        self.images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def loader(self, steps: int) -> DeviceLoader:
        n = self.args.batch_size * steps
        return DeviceLoader(self.images[:n], self.labels[:n], self.args.batch_size, train_transforms(),
                            shuffle=True, device=self.device, drop_last=True)

    def train(self, loader: DeviceLoader) -> None:
        train_epoch(self.step_model, loader, self.optimizer, nn.CrossEntropyLoss(), 1, self.device,
                    self.precision.dtype, progress=False, scaler=self.scaler)

    def epoch(self, steps: int) -> float:
        """Seconds for `steps` training steps (one train_epoch), synchronised."""
        loader = self.loader(steps)
        sync(self.device)
        start = time.perf_counter()
        self.train(loader)
        sync(self.device)
        return time.perf_counter() - start

    def syncs(self, steps: int) -> int:
        loader = self.loader(steps)
        return host_syncs(self.device, lambda: self.train(loader))


def measure(args, device, amp, layout, mode) -> dict:
    bench = Bench(args, device, amp, layout, mode)
    first = bench.epoch(2)  # compiles (compiled), picks cuDNN algorithms, makes the scaler's tensors
    timed = [bench.epoch(args.steps) / args.steps for _ in range(args.repeats)]
    step = statistics.median(timed)
    few, more = 2, max(args.steps, 3)
    syncs_per_step = (bench.syncs(more) - bench.syncs(few)) / (more - few)
    return {"precision": bench.precision.name, "layout": layout, "mode": mode, "step_ms": round(1000 * step, 2),
            "images_per_s": round(args.batch_size / step), "syncs_per_step": round(syncs_per_step, 2),
            "compile_s": round(max(first - 2 * step, 0.0), 1) if mode == "compiled" else ""}


def group_norm_share(args, device, amp: str) -> tuple[float, str]:
    """GroupNorm's share of the device time of profiled eager steps, and what was timed."""
    from torch.profiler import ProfilerActivity, profile

    bench = Bench(args, device, amp, "contiguous", "eager")
    bench.epoch(2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        bench.epoch(2)
    on_gpu = device.type == "cuda"
    return group_norm_percent(prof.key_averages(), on_gpu), "CUDA kernel time" if on_gpu else "self CPU time"


def group_norm_percent(events, on_gpu: bool) -> float:
    """GroupNorm's percentage of a profile (`key_averages()` entries), forward and backward.

    On a GPU, of the kernels' time. The profiler credits each kernel twice: to the kernel's own
    device event and, as self device time, to the CPU op that launched it; so the total sums the
    device events alone, as torch's own table does (profiler_util._build_table), without user
    annotations (the `Optimizer.step` spans, which cover kernels already counted). GroupNorm's part
    is the self device time of its ops (aten::native_group_norm and its backward): the time of the
    kernels they launched, once. On the CPU, every op's self CPU time (each instant counted once).
    """
    from torch.autograd import DeviceType

    if on_gpu:
        total = sum(e.self_device_time_total for e in events
                    if e.device_type != DeviceType.CPU and not e.is_user_annotation)
        norm = sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CPU and "group_norm" in e.key)
    else:
        total = sum(e.self_cpu_time_total for e in events)
        norm = sum(e.self_cpu_time_total for e in events if "group_norm" in e.key)
    return 100.0 * norm / total if total else 0.0


def checkpoint_write(args, device, out_dir: Path) -> tuple[float, float]:
    """Seconds and MB to write a full last.pt (model, fused SGD state, scaler, RNGs) inline: what each
    epoch hands to the background writer (bench/checkpoint_overlap.py measures the overlap)."""
    model = resnet18(width=args.width).to(device)
    config = Config(batch_size=args.batch_size)
    optimizer = make_optimizer(model, config, device)
    scaler = resolve_precision("fp16", device).grad_scaler(device)
    row = {"epoch": 1}
    with tempfile.TemporaryDirectory(dir=out_dir) as folder:
        path = Path(folder) / "last.pt"
        times = []
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            checkpoint.save_last(path, model, optimizer, make_scheduler(optimizer, config), scaler, None, 1, config,
                                 [row], 1, 0.0, "val_acc", device)
            times.append(time.perf_counter() - start)
        return min(times), path.stat().st_size / 1e6


def pipelines_ratio(args, device) -> dict:
    """One epoch (train + test) each way, after a warm-up epoch, on the same GPU (bench/pipelines.py)."""
    precision = resolve_precision("auto", device)
    precision.apply(device)  # as a run does
    config = Config(lr=0.05, batch_size=args.batch_size, width=args.width)
    std_train, std_test = pipelines.standard_loaders(args.data_dir, args.train_images, args.test_images,
                                                     args.batch_size, args.workers, device)
    s11_train, s11_test = pipelines.s11lib_loaders(args.data_dir, args.train_images, args.test_images,
                                                   args.batch_size, device)
    model, optimizer = pipelines.fresh(0, args, device, config)
    pipelines.standard_epoch(model, std_train, std_test, optimizer, device)
    standard = pipelines.standard_epoch(model, std_train, std_test, optimizer, device)
    model, optimizer = pipelines.fresh(0, args, device, config)
    scaler = precision.grad_scaler(device)
    pipelines.s11lib_epoch(model, s11_train, s11_test, optimizer, device, precision, scaler)
    ours = pipelines.s11lib_epoch(model, s11_train, s11_test, optimizer, device, precision, scaler)
    return {"standard_s": standard, "s11lib_s": ours, "ratio": standard / ours, "precision": str(precision)}


def machine(device: torch.device) -> dict:
    facts = {"torch": torch.__version__, "python": platform.python_version(),
             "precision (amp='auto')": str(resolve_precision("auto", device))}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        facts = {"GPU": torch.cuda.get_device_name(device), "compute capability": f"{major}.{minor}",
                 "GPU memory": f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB",
                 **facts, "CUDA": torch.version.cuda, "cuDNN": torch.backends.cudnn.version()}
    else:
        facts = {"CPU": platform.processor() or platform.machine(), "CPU threads": torch.get_num_threads(), **facts}
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="where gpu_report.md and gpu_report.csv go")
    parser.add_argument("--data-dir", required=True, help="the folder that holds cifar-10-batches-py/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median)")
    parser.add_argument("--modes", default=",".join(MODES), help="eager,compiled or one of them")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--train-images", type=int, default=50000, help="the pipelines' epoch")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=8, help="the standard pipeline's DataLoader workers")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke test: width 16, batch 2, 2 steps, compiled with the 'eager' backend, 64 images")
    args = parser.parse_args(argv)
    if args.tiny:
        # Width 16, not less: narrower channels_last steps meet oneDNN#6035 on the CPU (s11lib/device.py).
        # Batch 2: an fp16 step on the CPU takes 3 s at width 16 and batch 16 (no fast fp16 convolutions).
        args.batch_size, args.width, args.steps, args.repeats, args.compile_backend = 2, 16, 2, 1, "eager"
        args.train_images, args.test_images, args.workers = 64, 32, 0
    device = resolve_device(args.device)
    hazards = onednn_nhwc_hazards(resnet18(width=args.width)) if device.type == "cpu" else []
    if hazards:  # the report measures channels_last as asked: it cannot fall back as a run does
        parser.error(f"--width {args.width} on the CPU: channels_last there hangs or computes wrong gradients "
                     f"in {', '.join(hazards)} (oneDNN#6035); use --width {ONEDNN_NHWC_MIN_CHANNELS} or more")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as run() sets it
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    facts = machine(device)
    print(" | ".join(f"{k}: {v}" for k, v in facts.items()), flush=True)

    rows = []
    modes = args.modes.split(",")
    has_tf32 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    for mode in modes:
        for amp in (p for p in PRECISIONS if p != "tf32" or has_tf32):
            for layout in LAYOUTS:
                row = measure(args, device, amp, layout, mode)
                rows.append(row)
                print(f"{row['precision']:>4} {layout:<13} {mode:<8} {row['step_ms']:>9.2f} ms/step "
                      f"{row['images_per_s']:>8} img/s  syncs/step {row['syncs_per_step']}"
                      + (f"  compile {row['compile_s']} s" if mode == "compiled" else ""), flush=True)
    auto = resolve_precision("auto", device)
    share, timed_by = group_norm_share(args, device, "auto")
    print(f"GroupNorm: {share:.1f}% of the {timed_by} of an eager {auto.name} step", flush=True)
    write_s, write_mb = checkpoint_write(args, device, args.out_dir)
    print(f"last.pt: {write_mb:.1f} MB written in {write_s:.3f} s", flush=True)
    pipes = pipelines_ratio(args, device)
    print(f"one epoch: standard {pipes['standard_s']:.2f} s, s11lib {pipes['s11lib_s']:.2f} s, "
          f"ratio {pipes['ratio']:.2f}x", flush=True)

    with open(args.out_dir / "gpu_report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    command = "python bench/gpu_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# s11lib on {facts.get('GPU', facts.get('CPU'))}", "",
             f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, {time.perf_counter() - started:.0f} s in all.", ""]
    lines += [f"* {k}: {v}" for k, v in facts.items()]
    lines += ["", f"## Training step: ResNet18 width {args.width}, batch {args.batch_size}",
              f"Median of {args.repeats} x {args.steps} steps after warm-up; s11lib's augmentations included. "
              "compile_s: the first two steps' time beyond two timed steps. syncs_per_step: host syncs per "
              "extra step (0: none per step).", "",
              "| precision | layout | mode | ms/step | images/s | compile s | syncs/step |",
              "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['precision']} | {r['layout']} | {r['mode']} | {r['step_ms']:.2f} | {r['images_per_s']:,} | "
              f"{r['compile_s']} | {r['syncs_per_step']} |" for r in rows]
    eager = {(r["precision"], r["layout"]): r["step_ms"] for r in rows if r["mode"] == "eager"}
    if ("fp32", "contiguous") in eager:
        lines += ["", "Speed-up over fp32 contiguous eager: " + ", ".join(
            f"{p} {lay}: {eager[('fp32', 'contiguous')] / ms:.2f}x" for (p, lay), ms in eager.items())]
    lines += ["", "## Other figures", "",
              f"* GroupNorm (forward and backward): {share:.1f}% of the {timed_by} of an eager {auto.name} step.",
              f"* last.pt: {write_mb:.1f} MB, written (atomically, fsync'd) in {write_s:.3f} s.",
              f"* One epoch, {args.train_images:,} training + {args.test_images:,} test images: standard pipeline "
              f"{pipes['standard_s']:.2f} s, s11lib {pipes['s11lib_s']:.2f} s ({pipes['precision']}): "
              f"**{pipes['ratio']:.2f}x**.", ""]
    (args.out_dir / "gpu_report.md").write_text("\n".join(lines))
    print(f"wrote {args.out_dir / 'gpu_report.md'} and {args.out_dir / 'gpu_report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
