"""The model obeys the recipe: ResNet18 shape and size, LayerNorm only, per-sample normalisation."""
import pytest
import torch
from torch import nn

from s11lib.models import BasicBlock, layer_norm, resnet18


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
    # Each norm's output against one computed by hand from its input: one mean and one variance per
    # sample over all of (C, H, W) together, then the per-channel scale and shift. (Mean 0 and
    # variance 1 over the whole sample would not do: any GroupNorm has them.) The reference is in
    # float64; the layer computes in float32, under 1e-6 off on outputs of a few units, so 1e-4
    # leaves room for any CPU's summation order while a wrong grouping is off by far more (below).
    seen = []

    def check(module, inputs, output):
        x = inputs[0].double()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        scale, shift = (t.double().view(1, -1, 1, 1) for t in (module.weight, module.bias))
        expected = (x - mean) / torch.sqrt(var + module.eps) * scale + shift
        torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=1e-4)
        # The inputs can tell: 32 groups (a common GroupNorm) would be off here by more than 0.01.
        grouped = nn.functional.group_norm(x, 32, scale.flatten(), shift.flatten(), module.eps)
        assert (grouped - expected).abs().max() > 1e-2
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


def test_gradients_reach_every_parameter():
    # With the residual branches zeroed, their convolutions get no gradient on the first step
    # (the zero scale blocks it) but the zero scales do; after one step every parameter learns.
    torch.manual_seed(0)
    model = resnet18(width=8).train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        silent = {name for name, p in model.named_parameters() if not p.grad.any()}
        if step == 0:
            assert silent and all(".conv" in n or ".norm1." in n or n.endswith("norm2.bias") for n in silent)
            assert not any(n.endswith("norm2.weight") for n in silent)
        else:
            assert not silent, silent
        optimizer.step()


# --- initialisation --------------------------------------------------------------------------------
def _blocks(model):
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


def test_each_block_is_its_shortcut_at_initialisation():
    """zero_init_residual: the residual branch adds exactly 0, so a block is relu(shortcut(x)),
    and an identity-shortcut block passes its (non-negative, post-ReLU) input through unchanged."""
    torch.manual_seed(0)
    model = resnet18(width=8).train()
    x = torch.randn(3, 3, 32, 32)
    inputs = {}
    handles = [b.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, (i[0], o))) for b in _blocks(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert len(inputs) == 8
    identities = 0
    for block, (x_in, out) in inputs.items():
        with torch.no_grad():
            branch = block.norm2(block.conv2(torch.relu(block.norm1(block.conv1(x_in)))))
            assert torch.equal(branch, torch.zeros_like(branch))
            assert torch.equal(out, torch.relu(block.shortcut(x_in)))
        if len(block.shortcut) == 0:
            identities += 1
            assert torch.equal(out, x_in)
    assert identities == 5  # 8 blocks, 3 of them with a projection shortcut


def test_zero_init_residual_is_an_option():
    on, off = resnet18(width=8), resnet18(width=8, zero_init_residual=False)
    assert all(torch.equal(b.norm2.weight, torch.zeros(b.norm2.num_channels)) for b in _blocks(on))
    assert all(torch.equal(b.norm2.weight, torch.ones(b.norm2.num_channels)) for b in _blocks(off))
    # Only those scales: every other norm starts at scale 1, shift 0.
    others = [m for m in on.modules() if isinstance(m, nn.GroupNorm) and all(m is not b.norm2 for b in _blocks(on))]
    assert len(others) == 12 and all(torch.equal(m.weight, torch.ones_like(m.weight)) and
                                     torch.equal(m.bias, torch.zeros_like(m.bias)) for m in others)


@pytest.mark.parametrize("init", ["kaiming", "torch"])
def test_convolutions_are_initialised_as_named(init):
    """kaiming: He normal, fan_out, ReLU gain (std sqrt(2 / (k*k*out)), as torchvision's ResNet);
    torch: PyTorch's Conv2d default, kaiming_uniform(a=sqrt(5)), i.e. std 1 / sqrt(3 * k*k*in)."""
    torch.manual_seed(0)
    model = resnet18(init=init)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for conv in convs:
        out_ch, in_ch, kh, kw = conv.weight.shape
        expected = (2 / (kh * kw * out_ch)) ** 0.5 if init == "kaiming" else (1 / (3 * kh * kw * in_ch)) ** 0.5
        w = conv.weight.detach()
        tolerance = 4 / (2 * w.numel()) ** 0.5 + 0.01  # ~4 standard errors of a sample std
        assert abs(w.std().item() / expected - 1) < tolerance, (conv, w.std().item(), expected)
        assert abs(w.mean().item()) < 4 * expected / w.numel() ** 0.5
    normal = init == "kaiming"  # a normal sample exceeds the uniform's bound sqrt(3)*std; a uniform never does
    big = convs[-3].weight.detach()
    assert (big.abs().max().item() > 3 ** 0.5 * big.std().item() * 1.05) == normal


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        resnet18(width=4, init="xavier")


# --- under autocast ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_keep_the_autocast_dtype_and_the_model_stays_close_to_fp32(dtype):
    # Autocast runs group_norm in fp32 and returns fp32: ReLU, the residual add and the next
    # convolution's input cast would all move fp32 tensors. LayerNormCHW returns the autocast dtype.
    torch.manual_seed(0)
    model = resnet18(width=8, zero_init_residual=False).eval()  # zero-init would hide the branches' error
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    model.norm1.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)
    assert outputs == [torch.float32, dtype]
    # Relative to the logits' spread: bf16 keeps 8 bits of mantissa (~0.4%), fp16 11.
    spread = reference.std().item()
    assert (low.float() - reference).abs().max().item() <= (0.05 if dtype == torch.bfloat16 else 0.01) * spread


def test_outside_autocast_the_norm_is_group_norm_exactly():
    torch.manual_seed(0)
    norm = layer_norm(8)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 8, 5, 5)
    reference = nn.GroupNorm(1, 8)
    reference.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), reference(x))
