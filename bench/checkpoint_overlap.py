"""An epoch's checkpoint writes inline against in the background (s11lib's way), in one process.

    PYTHONPATH=. python bench/checkpoint_overlap.py [--width 64] [--batch-size 8] [--steps 10] [--epochs 4]
        [--rounds 3] [--threads N] [--dir DIR]

A stand-in for a short GPU epoch: `steps` training steps of the shipped ResNet18 (fused SGD, fp32)
on one random batch, then the epoch's files exactly as a run writes them (`checkpoint.last_state`,
the host copy, then `run.write_epoch_files`: last.pt, best.pt, metrics.csv, each fsync'd and
renamed). Width 64 gives the real last.pt (about 89 MB) and best.pt (45 MB). Every epoch
improves, so best.pt is written every time (the worst case). Each round times `epochs` epochs
each way, one way after the other, and the rounds repeat, so drift in the machine's speed hits
both:

* inline: train, copy, write; the epoch ends when the files are on disk;
* background: train, copy, hand the write to `atomic.BackgroundWriter`; the next epoch trains
  while it is written, and waits for it before handing over its own. The wait for the last
  epoch's write is part of the round's time.

Prints per epoch (each round's wall time over its epochs, the median over rounds) each way, the
write alone, the host copy, and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from s11lib import checkpoint
from s11lib.config import Config
from s11lib.models import resnet18
from s11lib.optim import make_optimizer, make_scheduler
from s11lib.run import write_epoch_files
from s11lib.utils import atomic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs each way in a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's threads for training (default: torch's own); fewer than the cores leave the "
                             "writer one, as a GPU run's host does")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    config = Config(batch_size=args.batch_size, width=args.width)
    model = resnet18(width=args.width)
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    criterion = nn.CrossEntropyLoss()

    def train() -> None:
        for _ in range(args.steps):
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    rows: list[dict] = []
    times = {"inline": [], "background": [], "write": [], "copy": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder, atomic.BackgroundWriter("bench") as writer:
        out_dir = Path(folder)

        def state(epoch: int) -> dict:
            rows.append({"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "seconds": 1.0})
            start = time.perf_counter()
            last = checkpoint.last_state(model, optimizer, scheduler, scaler, None, epoch, config, rows, epoch,
                                         50.0, "val_acc", device)
            times["copy"].append(time.perf_counter() - start)
            return last

        train()  # warm-up: the first step's allocations, the page cache's first files
        write_epoch_files(out_dir, state(0), True, [dict(r) for r in rows])
        epoch = 0
        for _ in range(args.rounds):
            for way in ("inline", "background"):
                start = time.perf_counter()
                for _ in range(args.epochs):
                    epoch += 1
                    train()
                    last = state(epoch)
                    if way == "inline":
                        write_start = time.perf_counter()
                        write_epoch_files(out_dir, last, True, [dict(r) for r in rows])
                        times["write"].append(time.perf_counter() - write_start)
                    else:  # waits for the previous epoch's write first
                        writer.submit(write_epoch_files, out_dir, last, True, [dict(r) for r in rows])
                writer.wait()  # the round's last write, before the clock stops
                times[way].append((time.perf_counter() - start) / args.epochs)
        sizes = {name: (out_dir / name).stat().st_size / 1e6 for name in (checkpoint.LAST, checkpoint.BEST)}
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; width {args.width}, batch "
          f"{args.batch_size}, {args.steps} steps an epoch; last.pt {sizes[checkpoint.LAST]:.1f} MB, "
          f"best.pt {sizes[checkpoint.BEST]:.1f} MB; {args.rounds} rounds of {args.epochs} epochs each way (medians)")
    print(f"  write alone (last.pt + best.pt + metrics.csv): {median['write']:.3f} s; "
          f"host copy: {median['copy']:.3f} s")
    print(f"  epoch with the writes inline:     {median['inline']:.3f} s")
    print(f"  epoch with the writes background: {median['background']:.3f} s")
    print(f"  inline / background: {median['inline'] / median['background']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
