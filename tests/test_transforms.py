"""Each batched augmentation against torchvision's functional op with the same sampled parameters,
and the distributions of the sampled parameters."""
import dataclasses

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from s11lib.constants import MEAN, STD
from s11lib.transforms import (AugmentParams, cutout, normalize, random_crop, rotate, test_transforms,
                               train_transforms)


# Bilinear rotation here and in torchvision sums the same four weighted pixels in a different order
# (and the CPU's vector width changes it again): measured on this CPU, up to 2.3e-6 on images in
# [0, 1] and 8.1e-6 after normalisation (x 1/std, about 4) (AMD EPYC, torch 2.14.1, 2026-11-24).
# 1e-4 leaves ten times that; an angle off by 0.01 degree is already 9e-3 off on every image.
BILINEAR_ATOL = 1e-4


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 3, 32, 32, generator=g)


@pytest.fixture
def params(images):
    return train_transforms().sample(images, torch.Generator().manual_seed(1))


def reference(image, p: AugmentParams, i: int, padding=4, size=16):
    """torchvision's functional ops, one image at a time, in the library's order."""
    top, left = p.crop_offsets[i].tolist()
    x = TF.crop(TF.pad(image, [padding]), top, left, 32, 32)
    x = TF.rotate(x, float(p.angles[i]), interpolation=InterpolationMode.BILINEAR)
    x = TF.normalize(x, MEAN, STD)
    return erase_clipped(x, *p.cutout_centers[i].tolist(), size)


def erase_clipped(image, row, col, size=16):
    """torchvision's F.erase on the size x size box centred at (row, col), clipped at the border."""
    r0, c0 = max(0, row - size // 2), max(0, col - size // 2)
    r1, c1 = min(image.shape[-2], row + size // 2), min(image.shape[-1], col + size // 2)
    return TF.erase(image, r0, c0, r1 - r0, c1 - c0, torch.tensor(0.0))


def test_random_crop_matches_torchvision(images, params):
    out = random_crop(images, params.crop_offsets, 4)
    for i, img in enumerate(images):
        top, left = params.crop_offsets[i].tolist()
        torch.testing.assert_close(out[i], TF.crop(TF.pad(img, [4]), top, left, 32, 32), atol=0, rtol=0)


def test_crop_extremes_are_shifts_with_black_borders(images):
    out = random_crop(images[:2], torch.tensor([[0, 0], [8, 8]]), 4)
    assert (out[0, :, :4, :] == 0).all() and (out[0, :, :, :4] == 0).all()
    torch.testing.assert_close(out[0, :, 4:, 4:], images[0, :, :28, :28])
    torch.testing.assert_close(out[1, :, :28, :28], images[1, :, 4:, 4:])


@pytest.mark.parametrize("angle", [-5.0, -2.5, 0.0, 1.7, 5.0, 30.0, 90.0])
def test_rotate_matches_torchvision(images, angle):
    angles = torch.full((len(images),), angle)
    out = rotate(images, angles)
    for i, img in enumerate(images):
        ref = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[i], ref, atol=BILINEAR_ATOL, rtol=0)


def test_rotate_uses_each_images_own_angle(images, params):
    out = rotate(images, params.angles)
    for i, img in enumerate(images):
        ref = TF.rotate(img, float(params.angles[i]), interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[i], ref, atol=BILINEAR_ATOL, rtol=0)


def test_cutout_matches_torchvision_erase_including_clipped_boxes(images):
    centers = torch.tensor([[0, 0], [31, 31], [16, 16], [3, 28], [8, 8]])
    out = cutout(images[:5], centers, 16)
    for i in range(5):
        torch.testing.assert_close(out[i], erase_clipped(images[i], *centers[i].tolist()), atol=0, rtol=0)
    assert (out[2] == 0).sum() == 3 * 16 * 16  # a hole fully inside is exactly 16x16


def test_whole_train_transform_matches_the_torchvision_composition(images, params):
    out = train_transforms().apply(images, params)
    off = train_transforms().apply(images, dataclasses.replace(params, angles=params.angles + 0.01))
    for i, img in enumerate(images):
        ref = reference(img, params, i)
        torch.testing.assert_close(out[i], ref, atol=BILINEAR_ATOL, rtol=0)
        assert (off[i] - ref).abs().max() > 10 * BILINEAR_ATOL  # the tolerance still tells


def test_uint8_input_equals_float_input(images, params):
    as_uint8 = (images * 255).round().to(torch.uint8)
    tf = train_transforms()
    torch.testing.assert_close(tf.apply(as_uint8, params), tf.apply(as_uint8.float() / 255, params))


def test_every_image_gets_fresh_parameters():
    same = torch.rand(1, 3, 32, 32).expand(64, 3, 32, 32).contiguous()
    torch.manual_seed(3)
    out = train_transforms()(same)
    distinct = {tuple(o.flatten()[::97].tolist()) for o in out}
    assert len(distinct) == 64
    # ...and fresh draws on every call.
    assert not torch.equal(train_transforms()(same), out)


def test_test_transform_only_normalises(images):
    out = test_transforms()(images)
    torch.testing.assert_close(out, TF.normalize(images, MEAN, STD))
    torch.testing.assert_close(normalize(images), out)


def test_output_stays_on_device_and_dtype(images):
    out = train_transforms()(images.double())
    assert out.dtype == torch.float64 and out.device == images.device and out.shape == images.shape


def test_bad_batches_are_one_line_errors():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        train_transforms()(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="uint8 or floating-point"):
        test_transforms()(torch.zeros(1, 3, 32, 32, dtype=torch.int32))


# --- distributions of the sampled parameters -------------------------------------------------
N = 90_000


@pytest.fixture(scope="module")
def many():
    return train_transforms().sample(torch.empty(N, 3, 32, 32), torch.Generator().manual_seed(2024))


def _uniform_counts_ok(values: torch.Tensor, k: int) -> None:
    """Each of k outcomes appears N/k times within 5 binomial standard deviations."""
    counts = torch.bincount(values, minlength=k).double()
    assert len(counts) == k, f"values outside 0..{k - 1}"
    expected = N / k
    sd = (N * (1 / k) * (1 - 1 / k)) ** 0.5
    assert ((counts - expected).abs() < 5 * sd).all(), counts.tolist()


def test_crop_offsets_are_uniform_over_all_nine_positions(many):
    for axis in range(2):
        _uniform_counts_ok(many.crop_offsets[:, axis], 9)


def test_angles_are_uniform_in_plus_minus_five_degrees(many):
    a = many.angles
    assert a.min() >= -5 and a.max() <= 5
    assert a.min() < -4.99 and a.max() > 4.99  # the whole range is used
    _uniform_counts_ok(((a + 5) / 10 * 10).long().clamp(max=9), 10)  # 10 bins of 1 degree
    assert abs(a.mean()) < 0.05 and abs(a.var() - 100 / 12) < 0.15


def test_cutout_centres_are_uniform_over_the_image(many):
    for axis in range(2):
        _uniform_counts_ok(many.cutout_centers[:, axis], 32)
    # Rows and columns are drawn independently.
    rows, cols = many.cutout_centers.double().T
    assert abs(torch.corrcoef(torch.stack([rows, cols]))[0, 1]) < 0.02


def test_an_augmentation_spared_leaves_the_image_as_torchvision_without_it(images):
    # Probability 0: the identity parameters, and the output is the others' composition alone.
    spared = train_transforms(crop_prob=0, rotate_prob=0, cutout_prob=0)
    params = spared.sample(images, torch.Generator().manual_seed(1))
    assert (params.crop_offsets == 4).all() and (params.angles == 0).all()
    torch.testing.assert_close(spared.apply(images, params), normalize(images), atol=BILINEAR_ATOL, rtol=0)
    # At 1 the draws are the very ones made before the options existed (no extra random numbers).
    always = train_transforms(crop_prob=1, rotate_prob=1, cutout_prob=1)
    first = always.sample(images, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(dataclasses.astuple(first),
                                                   dataclasses.astuple(train_transforms().sample(
                                                       images, torch.Generator().manual_seed(1)))))


@pytest.mark.parametrize("which", ["crop_prob", "rotate_prob", "cutout_prob"])
def test_each_augmentation_is_applied_with_its_probability(which):
    # 0.3 of the images, within 5 binomial standard deviations, the others untouched by it;
    # the two other augmentations still apply to every image.
    p = train_transforms(**{which: 0.3}).sample(torch.empty(N, 3, 32, 32), torch.Generator().manual_seed(7))
    applied = {"crop_prob": (p.crop_offsets != 4).any(1), "rotate_prob": p.angles != 0,
               "cutout_prob": (p.cutout_centers >= 0).all(1)}
    rate = applied[which].double().mean().item()
    expected = {"crop_prob": 0.3 * (1 - 1 / 81), "rotate_prob": 0.3, "cutout_prob": 0.3}[which]  # 1/81: the centre
    assert abs(rate - expected) < 5 * (expected * (1 - expected) / N) ** 0.5, rate
    for other, mask in applied.items():
        if other != which:
            assert mask.double().mean() > 0.95, other
    image = torch.rand(1, 3, 32, 32)
    spared_cutout = train_transforms(cutout_prob=0).apply(image, dataclasses.replace(
        p[:1], cutout_centers=torch.full((1, 2), -16)))
    assert not (spared_cutout == 0).all(1).any()  # no hole anywhere


def test_a_probability_outside_zero_to_one_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^cutout_prob must be in \[0, 1\], got 1.5$"):
        train_transforms(cutout_prob=1.5)
    from s11lib.config import Config
    with pytest.raises(ValueError, match=r"^rotate_prob must be in \[0, 1\], got -0.1$"):
        Config(rotate_prob=-0.1)
