"""Every knob of a run in one typed place, with units and reasons.

The notebook's `parameters` cell repeats these names and defaults for papermill;
tests/test_notebook.py checks the two agree, so they cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from s11lib.models.resnet import INITS

PLATEAU_METRICS = ("val_loss", "val_acc")
# `lr` is the rate for a batch of this many images; other batch sizes scale it linearly
# (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): the ratio lr / batch, which sets SGD's
# gradient-noise scale, stays the same, so batch 128 trains at a quarter of the rate of 512.
LR_REFERENCE_BATCH = 512


@dataclass
class Config:
    # --- data -------------------------------------------------------------------------------
    data_dir: str = "data"  # the folder that holds cifar-10-batches-py/
    download: bool = True  # fetch the official archive (md5-checked) when data_dir lacks it
    train_subset: int | None = None  # keep only the first N training images (quick runs, tests)
    test_subset: int | None = None  # keep only the first N test images
    val_size: int = 5000  # training images held out for the scheduler and the best checkpoint;
    #                       0 watches the test set instead, as the original assignment did
    # --- optimisation -----------------------------------------------------------------------
    epochs: int = 40
    batch_size: int = 512  # images per step (evaluation uses the same)
    lr: float = 0.8  # peak SGD rate for a batch of 512 (docs/recipe.md); the run uses lr * batch_size / 512 (peak_lr)
    momentum: float = 0.9  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 on the convolution and linear weights
    decay_norm_and_bias: bool = False  # also decay norm scales and shifts and biases (timm and torchvision don't)
    label_smoothing: float = 0.0  # training loss only; reported losses are plain cross-entropy
    warmup_epochs: int = 2  # linear LR ramp from ~0 to peak_lr, per step; 0: none. The plateau scheduler starts after
    warmup_min_steps: int = 100  # the ramp lasts at least this many steps, however few an epoch has
    plateau_metric: str = "val_acc"  # what ReduceLROnPlateau watches; its mode follows (acc: max, loss: min)
    plateau_factor: float = 0.2  # LR multiplier on a plateau
    plateau_patience: int = 2  # epochs without improvement before the LR drops
    plateau_threshold: float = 1e-3  # relative improvement that counts as one
    min_lr: float = 1e-5  # the LR never drops below this
    ema_decay: float = 0.0  # 0: off; else an average of the weights, this decay per step, evaluated beside them
    seed: int = 1  # model init, shuffling and augmentation draws (the val split has its own fixed seed)
    # --- model and machine ------------------------------------------------------------------
    width: int = 64  # ResNet18's first-stage channels; smaller only for quick tests
    zero_init_residual: bool = True  # each residual branch's last norm scale starts at 0 (block = shortcut)
    init: str = "kaiming"  # conv weights: "kaiming" (He normal, fan_out) or "torch" (PyTorch's layer default)
    device: str = "auto"  # "auto" (cuda when there is one, else cpu), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU, where bf16 is slower)
    # --- outputs ----------------------------------------------------------------------------
    out_dir: str = "runs/train"  # where metrics, checkpoints and figures go
    resume: bool = True  # out_dir holds last.pt: continue that run; False: start over (its files are replaced)
    gradcam_layer: str = "layer3"  # 8x8 on a 32x32 input; layer4 is only 4x4 (see README)
    num_misclassified: int = 20  # misclassified test images to show (and explain with Grad-CAM)
    progress: bool = True  # a tqdm bar per epoch

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be above 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.warmup_min_steps >= 0, f"warmup_min_steps must be >= 0, got {self.warmup_min_steps}"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}"),
            (self.plateau_metric in PLATEAU_METRICS,
             f"plateau_metric must be one of {PLATEAU_METRICS}, got {self.plateau_metric!r}"),
            (0 < self.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {self.plateau_factor}"),
            (self.plateau_patience >= 0, f"plateau_patience must be >= 0, got {self.plateau_patience}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.width >= 1, f"width must be at least 1, got {self.width}"),
            (self.num_misclassified >= 1, f"num_misclassified must be at least 1, got {self.num_misclassified}"),
        ]
        for subset in ("train_subset", "test_subset"):
            value = getattr(self, subset)
            checks.append((value is None or value >= 1, f"{subset} must be None or at least 1, got {value}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def peak_lr(self) -> float:
        """The SGD rate this run reaches after its warm-up: `lr` scaled linearly from batch 512."""
        return self.lr * self.batch_size / LR_REFERENCE_BATCH

    @property
    def plateau_mode(self) -> str:
        """ReduceLROnPlateau's mode, derived from the metric it watches."""
        return "min" if self.plateau_metric.endswith("_loss") else "max"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from a dict; an unknown key is an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


