"""Grad-CAM against captum's LayerGradCam (ReLU, bilinear upsampling) on the same model and images."""
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam

from s11lib.models import resnet18
from s11lib.utils.gradcam import GradCAM, normalize_maps, overlay


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = resnet18(width=16).eval()
    # Non-trivial norm affines so the maps are not those of a freshly initialised net.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4", "layer3.0"])
def test_raw_maps_match_captum(model, images, layer):
    targets = torch.tensor([0, 3, 5, 9, 1, 1])
    with GradCAM(model, layer) as cam:
        ours, used = cam.attribute(images, targets)
    reference = LayerGradCam(model, model.get_submodule(layer)).attribute(images, target=targets, relu_attributions=True)
    reference = LayerAttribution.interpolate(reference, (32, 32), interpolate_mode="bilinear")[:, 0]
    assert torch.equal(used, targets)
    assert ours.abs().sum() > 0  # a map of zeros would match trivially
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


def test_default_target_is_the_predicted_class(model, images):
    with GradCAM(model, "layer3") as cam:
        _, used = cam.attribute(images)
    assert torch.equal(used, model(images).argmax(1))


def test_heatmaps_are_in_unit_range_one_per_image(model, images):
    with GradCAM(model, "layer3") as cam:
        maps = cam(images)
    assert maps.shape == (6, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1
    nonconstant = maps.flatten(1).amax(1) > 0
    assert torch.allclose(maps.flatten(1).amax(1)[nonconstant], torch.ones(int(nonconstant.sum())))


def test_constant_map_normalises_to_zeros():
    assert torch.equal(normalize_maps(torch.full((1, 4, 4), 3.0)), torch.zeros(1, 4, 4))


def test_hooks_are_removed_and_errors_are_not_swallowed(model, images):
    layer = model.layer3
    before = len(layer._forward_hooks)
    with pytest.raises(ZeroDivisionError):
        with GradCAM(model, "layer3") as cam:
            assert len(layer._forward_hooks) == before + 1
            cam(images[:1])
            1 / 0
    assert len(layer._forward_hooks) == before


def test_no_growth_over_repeated_use(model, images):
    for _ in range(20):
        with GradCAM(model, "layer3") as cam:
            cam(images[:2])
    assert not model.layer3._forward_hooks and cam._activations is None


def test_model_mode_is_restored(model, images):
    model.train()
    with GradCAM(model, "layer4") as cam:
        cam(images[:1])
    assert model.training
    model.eval()


def test_outside_with_block_is_an_error(model, images):
    with pytest.raises(RuntimeError, match="with"):
        GradCAM(model, "layer3")(images[:1])


def test_unknown_layer_is_a_one_line_error(model):
    with pytest.raises(ValueError, match=r"unknown gradcam_layer 'layer9'.*layer1"):
        GradCAM(model, "layer9")


def test_overlay_blends_colour_over_image():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    out = overlay(image, torch.ones(8, 8), alpha=0.5)
    assert out.shape == (8, 8, 3) and 0 < out.max() <= 0.5 + 1e-6
    assert (overlay(image, torch.ones(8, 8), alpha=0.0) == 0).all()
    with pytest.raises(ValueError):
        overlay(image, torch.ones(8, 8), alpha=2)
