"""s11lib's data path against the standard pipeline, both in one process, same model, same images.

    python bench/pipelines.py --data-dir ../shared/datasets/cifar10                 # CPU, a subset
    python bench/pipelines.py --data-dir data --device cuda --train-images 50000 --test-images 10000

standard: what users write. A torchvision-style CIFAR10 data set with per-sample transforms
    (RandomCrop(32, padding=4), RandomRotation(5, bilinear), ToTensor, Normalize, then a
    per-sample CutOut 16x16 with the same clipped box as s11lib's), a DataLoader with worker
    processes, fp32, eager, and `loss.item()` after every step.
s11lib: the whole split as uint8 on the device, shuffled and batched there, the same three
    augmentations applied to whole batches (s11lib.transforms), the precision amp="auto" picks
    (s11lib/device.py: bf16 from compute capability 8.0, fp16 on 7.x, else fp32), a fused
    optimizer, sums kept on the device (s11lib.utils.train_test).

Prints a table: device, torch version, augmentation throughput alone (images/s), seconds per
epoch (train + test) and the ratios. --accuracy-epochs N also trains N epochs both ways from the
same initial weights and prints the test accuracy of each (the recipe must not change).
Record results with the machine and date in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from torch import nn

from s11lib.config import Config
from s11lib.constants import MEAN, STD
from s11lib.loaders import DeviceLoader, load_cifar10
from s11lib.models import resnet18
from s11lib.optim import make_optimizer
from s11lib.device import resolve_device, resolve_precision
from s11lib.transforms import test_transforms, train_transforms
from s11lib.utils.train_test import evaluate, train_epoch


class CutOut:
    """Per-sample CutOut as course repositories write it: a 16x16 hole with a uniform centre,
    clipped at the border, on the normalised tensor (filled with 0, the mean colour)."""

    def __init__(self, size: int = 16):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        row, col = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, left = max(row - self.size // 2, 0), max(col - self.size // 2, 0)
        bottom, right = min(row - self.size // 2 + self.size, h), min(col - self.size // 2 + self.size, w)
        image = image.clone()
        image[:, top:bottom, left:right] = 0.0
        return image


class CIFAR10Images(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: HWC uint8 -> PIL image -> transform.

    (torchvision's class itself checks the official files' md5; the shared copy's batches hold the
    same images in another order, so it refuses them. The per-item work is the same.)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3), as torchvision keeps them
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def standard_datasets(data_dir: str, train_images: int, test_images: int):
    from torchvision import transforms as T

    # Bilinear, as s11lib rotates (RandomRotation's default is nearest, which is cheaper and blockier).
    rotation = T.RandomRotation(5, interpolation=T.InterpolationMode.BILINEAR)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), rotation, T.ToTensor(), T.Normalize(MEAN, STD), CutOut(16)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    train_x, train_y = load_cifar10(data_dir, train=True)
    test_x, test_y = load_cifar10(data_dir, train=False)
    return (CIFAR10Images(train_x[:train_images], train_y[:train_images], train_tf),
            CIFAR10Images(test_x[:test_images], test_y[:test_images], test_tf))


def standard_loaders(data_dir, train_images, test_images, batch_size, workers, device):
    train, test = standard_datasets(data_dir, train_images, test_images)
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    return (torch.utils.data.DataLoader(train, shuffle=True, drop_last=True, **common),
            torch.utils.data.DataLoader(test, shuffle=False, **common))


def s11lib_loaders(data_dir, train_images, test_images, batch_size, device):
    train_x, train_y = load_cifar10(data_dir, train=True)
    test_x, test_y = load_cifar10(data_dir, train=False)
    train = DeviceLoader(train_x[:train_images], train_y[:train_images], batch_size, train_transforms(), shuffle=True,
                         device=device, drop_last=True)
    test = DeviceLoader(test_x[:test_images], test_y[:test_images], batch_size, test_transforms(), device=device)
    return train, test


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augmentation_rate(loader, device, passes: int) -> float:
    """Images per second through the loader alone (no model); the first pass warms up."""
    for x, _ in loader:  # warm-up: workers start, kernels load
        x.to(device, non_blocking=True)
    sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(passes):
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            seen += len(x)
    sync(device)
    return seen / (time.perf_counter() - start)


def standard_epoch(model, train, test, optimizer, device) -> float:
    """The loop users write: fp32, eager, a host read per step."""
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    model.train()
    running = 0.0
    for x, y in train:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        running += loss.item()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum().item()
    sync(device)
    return time.perf_counter() - start


def s11lib_epoch(model, train, test, optimizer, device, precision, scaler, epoch=1) -> float:
    start = time.perf_counter()
    train_epoch(model, train, optimizer, nn.CrossEntropyLoss(), epoch, device, precision.dtype, progress=False,
                scaler=scaler)
    evaluate(model, test, nn.CrossEntropyLoss(), device, precision.dtype)
    sync(device)
    return time.perf_counter() - start


def standard_accuracy(model, train, test, optimizer, device, epochs) -> float:
    for _ in range(epochs):
        standard_epoch(model, train, test, optimizer, device)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def s11lib_accuracy(model, train, test, optimizer, device, precision, epochs) -> float:
    scaler = precision.grad_scaler(device)
    for epoch in range(1, epochs + 1):
        train_epoch(model, train, optimizer, nn.CrossEntropyLoss(), epoch, device, precision.dtype, progress=False,
                    scaler=scaler)
    return evaluate(model, test, nn.CrossEntropyLoss(), device, precision.dtype)[0].accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="the folder that holds cifar-10-batches-py/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2, help="the standard pipeline's DataLoader workers")
    parser.add_argument("--aug-passes", type=int, default=3, help="timed passes over the training images (augmentation only)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline (after one warm-up epoch)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--accuracy-epochs", type=int, default=0, help="also train this many epochs both ways")
    parser.add_argument("--seeds", type=int, default=1, help="accuracy runs per pipeline (seeds 0, 1, ...)")
    parser.add_argument("--skip-timing", action="store_true", help="only the accuracy check")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)  # what a run on this device uses
    precision.apply(device)
    config = Config(lr=args.lr, batch_size=args.batch_size, width=args.width)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"python {platform.python_version()}; s11lib precision: {precision}")
    print(f"images: {args.train_images} train, {args.test_images} test; batch {args.batch_size}; "
          f"ResNet18 width {args.width}; standard DataLoader workers: {args.workers}")

    std_train, std_test = standard_loaders(args.data_dir, args.train_images, args.test_images, args.batch_size,
                                           args.workers, device)
    s11_train, s11_test = s11lib_loaders(args.data_dir, args.train_images, args.test_images, args.batch_size, device)

    if not args.skip_timing:
        timing(args, device, precision, config, std_train, std_test, s11_train, s11_test)
    if args.accuracy_epochs:
        accuracy_check(args, device, precision, config, std_train, std_test, s11_train, s11_test)
    return 0


def fresh(seed: int, args, device, config):
    torch.manual_seed(seed)
    model = resnet18(width=args.width).to(device)
    return model, make_optimizer(model, config, device)


def timing(args, device, precision, config, std_train, std_test, s11_train, s11_test) -> None:
    torch.manual_seed(0)
    aug = {"standard": augmentation_rate(std_train, device, args.aug_passes),
           "s11lib": augmentation_rate(s11_train, device, args.aug_passes)}

    epoch = {}
    model, optimizer = fresh(0, args, device, config)
    standard_epoch(model, std_train, std_test, optimizer, device)  # warm-up
    epoch["standard"] = min(standard_epoch(model, std_train, std_test, optimizer, device) for _ in range(args.epochs))
    model, optimizer = fresh(0, args, device, config)
    scaler = precision.grad_scaler(device)
    s11lib_epoch(model, s11_train, s11_test, optimizer, device, precision, scaler)
    epoch["s11lib"] = min(s11lib_epoch(model, s11_train, s11_test, optimizer, device, precision, scaler)
                          for _ in range(args.epochs))

    print()
    print(f"| {'pipeline':<9} | {'augmentation, images/s':>22} | {'epoch (train + test), s':>23} |")
    print(f"|{'-' * 11}|{'-' * 24}|{'-' * 25}|")
    for key in ("standard", "s11lib"):
        print(f"| {key:<9} | {aug[key]:>22,.0f} | {epoch[key]:>23.2f} |")
    print(f"| {'ratio':<9} | {aug['s11lib'] / aug['standard']:>21.1f}x | {epoch['standard'] / epoch['s11lib']:>22.2f}x |")
    print("(epoch: the fastest of the timed epochs, after a warm-up epoch; ratio > 1: s11lib is faster)")


def accuracy_check(args, device, precision, config, std_train, std_test, s11_train, s11_test) -> None:
    """Train both ways from the same initial weights, per seed; the recipe must not change."""
    results = {"standard": [], "s11lib": []}
    for seed in range(args.seeds):
        model, optimizer = fresh(seed, args, device, config)
        results["standard"].append(standard_accuracy(model, std_train, std_test, optimizer, device, args.accuracy_epochs))
        model, optimizer = fresh(seed, args, device, config)
        results["s11lib"].append(s11lib_accuracy(model, s11_train, s11_test, optimizer, device, precision,
                                                 args.accuracy_epochs))
        print(f"seed {seed}: standard {results['standard'][-1]:.2f}%, s11lib {results['s11lib'][-1]:.2f}%", flush=True)
    for key, values in results.items():
        t = torch.tensor(values)
        spread = f" +- {t.std().item():.2f}" if len(values) > 1 else ""
        print(f"{key}: test accuracy after {args.accuracy_epochs} epochs, mean {t.mean().item():.2f}%{spread} "
              f"over {len(values)} seed(s), on {args.test_images} test images")


if __name__ == "__main__":
    sys.exit(main())
