"""The explore notebook's heatmap checks, timed: what a user waits for, at the widths given.

    python bench/cam_checks.py --data-dir ../shared/datasets/cifar10                  # CPU, widths 16 and 64
    python bench/cam_checks.py --data-dir data --device cuda --widths 64

For each width, as explore.ipynb runs them: the sanity check (cascading randomisation, Grad-CAM
at layer2 to layer4) on --mistakes test images, then deletion and insertion (Grad-CAM at three
layers and the two baselines) on --mistakes + --correct images in --steps shares. The weights are
random: the cost does not depend on them. Beside it, deletion and insertion on the first
--mistakes images two ways in this process: cam_checks' batched one and a plain one that predicts
one masked image at a time, with their ratio. Record results with the machine and date
(docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from s11lib.loaders import load_cifar10
from s11lib.models import resnet18
from s11lib.transforms import test_transforms
from s11lib.utils import cam_checks


@torch.inference_mode()
def plain_deletion_insertion(model, images, targets, maps, steps: int, fill: float = 0.0) -> None:
    """The loop a first version writes: per map, image and step, mask one image and predict it."""
    for heatmaps in maps.values():
        ranks = cam_checks.pixel_ranks(heatmaps).to(images.device)
        for image, target, rank in zip(images, targets, ranks):
            for step in range(steps + 1):
                first = (rank < round(step / steps * rank.numel())).reshape(1, *image.shape[1:])
                for x in (torch.where(first, fill, image), torch.where(first, image, fill)):
                    model(x[None]).softmax(1)[0, target].item()


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", default="16,64")
    parser.add_argument("--mistakes", type=int, default=20)
    parser.add_argument("--correct", type=int, default=100)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    images, _ = load_cifar10(args.data_dir, train=False, download=False)
    inputs = test_transforms()(images[: args.mistakes + args.correct].to(device))
    groups = (slice(0, args.mistakes), slice(args.mistakes, None))
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {device}; "
          f"{args.mistakes} + {args.correct} images, {args.steps} steps")
    print(f"| width | sanity check s | deletion + insertion s | in all s | {args.mistakes} images batched s "
          "| one at a time s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        torch.manual_seed(0)
        model = resnet18(width=width).to(device).eval()
        with torch.no_grad():
            targets = model(inputs).argmax(1)
        maps = [cam_checks.candidate_maps(model, inputs[g], targets[g]) for g in groups]
        sanity = _timed(lambda: cam_checks.randomization_check(model, inputs[groups[0]], targets[groups[0]]))
        scores = _timed(lambda: [cam_checks.deletion_insertion(model, inputs[g], targets[g],
                                                               cam_checks.candidate_maps(model, inputs[g], targets[g]),
                                                               steps=args.steps) for g in groups])
        batched = _timed(lambda: cam_checks.deletion_insertion(model, inputs[groups[0]], targets[groups[0]], maps[0],
                                                               steps=args.steps))
        plain = _timed(lambda: plain_deletion_insertion(model, inputs[groups[0]], targets[groups[0]], maps[0],
                                                        args.steps))
        print(f"| {width} | {sanity:.1f} | {scores:.1f} | {sanity + scores:.1f} | {batched:.1f} | {plain:.1f} "
              f"| {plain / batched:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
