"""Batched CIFAR-10 augmentations: whole batches in, whole batches out, on any device.

The training recipe is RandomCrop(32, padding=4), a rotation by a uniform angle in [-5, 5]
degrees and CutOut 16x16, then per-channel normalisation. Each image gets its own random
parameters, but no Python loop runs over images: each step is a few tensor operations over the
batch, so on a GPU the data never leaves the device (the airbench habit).

Order: crop, rotate, normalise, then cut out. Cutting out last keeps the hole an exact 16x16
square in the image the model sees (rotating after it would tilt and blur its edges). The hole is
filled with 0 after normalisation, i.e. with the data set's mean colour, as in DeVries & Taylor
(2017), whose hole centre is uniform over the image and whose box is clipped at the border, so a
hole can hang partly outside. Crop padding and the corners the rotation uncovers are black
(torchvision's fill=0), bilinear interpolation for the rotation.

`sample_params` and `apply` are separate so the tests can feed the very same parameters to
torchvision's functional ops, one image at a time, and compare (tests/test_transforms.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from s11lib.constants import MEAN, STD


@dataclass(frozen=True)
class AugmentParams:
    """One batch's random draws, one row per image."""

    crop_offsets: torch.Tensor  # (N, 2) int64: (top, left) of the window in the padded image
    angles: torch.Tensor  # (N,) float32 degrees, counter-clockwise (torchvision's convention)
    cutout_centers: torch.Tensor  # (N, 2) int64: (row, col) of the hole's centre

    def __getitem__(self, rows: slice) -> "AugmentParams":
        """The draws of some of the images: one rank's share of a batch drawn whole."""
        return AugmentParams(self.crop_offsets[rows], self.angles[rows], self.cutout_centers[rows])


def random_crop(images: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding` on each side, then take each image's window at its (top, left).

    The same as torchvision's F.crop(F.pad(img, padding), top, left, H, W) per image. Works on
    uint8 and float batches alike (cropping the uint8 batch moves a quarter of the bytes).
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    # Every (2p+1)^2 window as a view (N, C, 2p+1, 2p+1, H, W); one advanced index picks each
    # image's own window: a copy of whole 32x32 planes, about twice as fast on the CPU as
    # gathering rows and columns separately.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(n, device=images.device), :, offsets[:, 0], offsets[:, 1]]


def rotate(images: torch.Tensor, angles: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Rotate each image about its centre by its angle in degrees, counter-clockwise, zero fill.

    The same as torchvision's F.rotate(img, angle, interpolation) per image: both build the
    sampling grid at pixel centres (align_corners=False) and sample with grid_sample.
    """
    n, _, h, w = images.shape
    radians = angles.to(images.dtype if images.is_floating_point() else torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    # affine_grid maps each output position to the input position it samples: the inverse
    # rotation, in coordinates normalised by the half-width and half-height.
    theta = torch.stack(
        [torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1
    )
    grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def cutout(images: torch.Tensor, centers: torch.Tensor, size: int, value: float = 0.0) -> torch.Tensor:
    """Fill a size x size box around each image's centre with `value`, clipped at the border.

    The same as torchvision's F.erase(img, top, left, height, width, value) with the clipped box.
    """
    _, _, h, w = images.shape
    top = centers[:, 0, None] - size // 2  # (N, 1)
    left = centers[:, 1, None] - size // 2
    rows = torch.arange(h, device=images.device)[None, :]
    cols = torch.arange(w, device=images.device)[None, :]
    in_rows = (rows >= top) & (rows < top + size)  # (N, H)
    in_cols = (cols >= left) & (cols < left + size)  # (N, W)
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, H, W)
    return images.masked_fill(hole, value)


def normalize(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Per-channel (x - mean) / std."""
    mean_t, std_t = _channel_constants(tuple(map(float, mean)), tuple(map(float, std)), images.dtype, images.device)
    return (images - mean_t) / std_t


@functools.lru_cache(maxsize=None)
def _channel_constants(mean: tuple, std: tuple, dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, C, 1, 1) tensors, made once per device and dtype: building them from a
    tuple on every call is a pageable host-to-device copy and a stream sync, twice per batch."""
    with torch.inference_mode(False):  # usable in autograd even if first made under inference_mode
        return (torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1),
                torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float input is passed through."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not images.is_floating_point():
        raise TypeError(f"expected a uint8 or floating-point image batch, got {images.dtype}")
    return images


def _check_batch(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected an image batch of shape (N, 3, H, W), got {tuple(images.shape)}")


class TrainTransform:
    """The training augmentations, as one callable over batches.

    Args:
        padding: RandomCrop's zero padding on each side (the crop size is the image size).
        max_angle: rotation angles are uniform in [-max_angle, max_angle] degrees.
        cutout_size: side of the square hole, in pixels.
        mean, std: per-channel normalisation.
        interpolation: grid_sample mode of the rotation, "bilinear" or "nearest".
        crop_prob, rotate_prob, cutout_prob: how often each augmentation is applied, each image
            drawn on its own; an image spared one gets its identity parameters (the centred
            window, angle 0, a hole wholly outside the image). At 1 (the default) nothing more is
            drawn, so the draws are the same as before these options.
    """

    def __init__(
        self,
        padding: int = 4,
        max_angle: float = 5.0,
        cutout_size: int = 16,
        mean=MEAN,
        std=STD,
        interpolation: str = "bilinear",
        crop_prob: float = 1.0,
        rotate_prob: float = 1.0,
        cutout_prob: float = 1.0,
    ):
        for name, prob in (("crop_prob", crop_prob), ("rotate_prob", rotate_prob), ("cutout_prob", cutout_prob)):
            if not 0 <= prob <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {prob}")
        self.probs = (crop_prob, rotate_prob, cutout_prob)
        self.padding = padding
        self.max_angle = max_angle
        self.cutout_size = cutout_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.interpolation = interpolation

    def sample(self, images: torch.Tensor, generator: torch.Generator | None = None,
               count: int | None = None) -> AugmentParams:
        """Draw fresh parameters for every image of the batch, on the batch's device.

        `count`: draw for this many images of the batch's size instead, e.g. the whole global batch
        of which `images` is one rank's share (the draws are then those of a single process).
        """
        _check_batch(images)
        _, _, h, w = images.shape
        n = len(images) if count is None else count
        dev = images.device
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), device=dev, generator=generator)
        unit = torch.rand(n, device=dev, generator=generator)
        angles = (2 * unit - 1) * self.max_angle
        rows = torch.randint(0, h, (n, 1), device=dev, generator=generator)
        cols = torch.randint(0, w, (n, 1), device=dev, generator=generator)
        centers = torch.cat([rows, cols], 1)
        crop_prob, rotate_prob, cutout_prob = self.probs
        if crop_prob < 1:
            offsets = offsets.where(self._applied(n, crop_prob, dev, generator)[:, None], self.padding)
        if rotate_prob < 1:
            angles = angles.where(self._applied(n, rotate_prob, dev, generator), 0.0)
        if cutout_prob < 1:
            centers = centers.where(self._applied(n, cutout_prob, dev, generator)[:, None], -self.cutout_size)
        return AugmentParams(offsets, angles, centers)

    @staticmethod
    def _applied(n: int, prob: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """(n,) bool: which images get an augmentation applied with probability `prob`."""
        return torch.rand(n, device=device, generator=generator) < prob

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply given parameters: crop, rotate, normalise, cut out."""
        _check_batch(images)
        x = random_crop(images, params.crop_offsets, self.padding)  # before to_float: on uint8 if given
        x = rotate(to_float(x), params.angles, self.interpolation)
        x = normalize(x, self.mean, self.std)
        return cutout(x, params.cutout_centers, self.cutout_size, 0.0)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.sample(images, generator))

    def __repr__(self) -> str:
        crop, rot, cut = (f", p={p:g}" if p < 1 else "" for p in self.probs)
        return (
            f"TrainTransform(RandomCrop(padding={self.padding}{crop}), Rotate(+-{self.max_angle} deg, "
            f"{self.interpolation}{rot}), Normalize, CutOut({self.cutout_size}x{self.cutout_size}{cut}))"
        )


class TestTransform:
    """Test-time preprocessing: per-channel normalisation only."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, mean=MEAN, std=STD):
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images)
        return normalize(to_float(images), self.mean, self.std)

    def __repr__(self) -> str:
        return "TestTransform(Normalize)"


def train_transforms(**kwargs) -> TrainTransform:
    """The recipe's training augmentations: batch (N, 3, 32, 32) in [0, 1] -> augmented, normalised."""
    return TrainTransform(**kwargs)


def test_transforms(**kwargs) -> TestTransform:
    """The matching test-time callable: normalisation only."""
    return TestTransform(**kwargs)


test_transforms.__test__ = False  # keep pytest from collecting the factory as a test
