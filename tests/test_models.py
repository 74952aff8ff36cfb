"""The model obeys the recipe: ResNet18 shape and size, LayerNorm only, per-sample normalisation."""
import pytest
import torch
from torch import nn

from s11lib.models import resnet18


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet18()


def test_parameter_count_is_resnet18(model):
    # kuangliu's BatchNorm ResNet18 for CIFAR has 11,173,962; GroupNorm has the same affine params.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_no_batchnorm_anywhere(model):
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))]
    assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not any("bn" in name.split(".")[-1] for name, _ in model.named_modules())
    # 1 stem + 4 stages x 2 blocks x 2 + 3 shortcut projections = 20 norm layers, all one-group GroupNorm.
    assert len(norms) == 20
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in norms)


def test_every_norm_normalises_each_sample_over_chw(model):
    seen = []

    def check(module, inputs, output):
        x = inputs[0]
        # Undo the per-channel affine, then each sample must have mean 0, var 1 over (C, H, W).
        plain = (output - module.bias.view(1, -1, 1, 1)) / module.weight.view(1, -1, 1, 1)
        flat = plain.flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(len(x)), atol=1e-4, rtol=0)
        torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(len(x)), atol=1e-3, rtol=0)
        seen.append(module)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
        handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, nn.GroupNorm)]
        try:
            model.train()(torch.randn(3, 3, 32, 32) * 4 + 2)
        finally:
            for h in handles:
                h.remove()
    assert len(seen) == 20


def test_a_sample_does_not_depend_on_its_batch(model):
    # The property BatchNorm lacks: in training mode, a sample's logits are the same alone or in a batch.
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_shapes_and_no_nan(model):
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, 512, 4, 4)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(model.forward_head(features), logits)


def test_cifar_stem_keeps_32x32_in_layer1(model):
    shapes = {}
    handles = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape[-2:]))
               for n in ("layer1", "layer2", "layer3", "layer4")]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert [tuple(shapes[n]) for n in ("layer1", "layer2", "layer3", "layer4")] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_gradients_reach_every_parameter(model):
    model.train()
    model.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
