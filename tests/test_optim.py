"""The optimiser's groups, the warm-up rule and the weight average (s11lib/optim.py)."""
import copy

import pytest
import torch
from torch import nn

from s11lib.config import Config
from s11lib.models import resnet18
from s11lib.optim import Warmup, WeightAverage, load_optimizer_state, make_optimizer, param_groups

CPU = torch.device("cpu")


def _norms_and_biases(model: nn.Module) -> list[nn.Parameter]:
    """Named by module type, independently of param_groups' rule."""
    found = [p for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()]
    found += [m.bias for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None]
    return found


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_hold_every_parameter_once():
    model = resnet18(width=8)
    groups = make_optimizer(model, Config(weight_decay=5e-4), CPU).param_groups
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len(list(model.parameters())) == len(_ids(every))
    assert _ids(every) == _ids(model.parameters())
    decay, no_decay = groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    assert _ids(no_decay["params"]) == _ids(_norms_and_biases(model))  # 20 norms x 2 + the classifier's bias
    assert len(no_decay["params"]) == 41
    assert all(p.ndim == 4 for p in decay["params"][:-1]) and decay["params"][-1] is model.linear.weight


def test_decay_norm_and_bias_puts_everything_in_one_decayed_group():
    model = resnet18(width=8)
    (group,) = make_optimizer(model, Config(decay_norm_and_bias=True, weight_decay=5e-4), CPU).param_groups
    assert _ids(group["params"]) == _ids(model.parameters()) and group["weight_decay"] == 5e-4


def test_norms_and_biases_are_not_decayed():
    # With zero gradients, a step moves a parameter only through its weight decay.
    torch.manual_seed(0)
    model = resnet18(width=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # no zero parameters, so decay would show everywhere
    before = copy.deepcopy(model)
    config = Config(optimizer="sgd", lr=0.1, weight_decay=0.1, momentum=0.0, batch_size=512)
    optimizer = make_optimizer(model, config, CPU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    still = _ids(_norms_and_biases(model))
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        if id(p) in still:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q * (1 - 0.1 * 0.1), msg=name)


def test_param_groups_skip_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 1e-4)
    assert [len(g["params"]) for g in groups] == [0, 3]


@pytest.mark.parametrize("epochs, steps_per_epoch, floor, expected", [
    (2, 88, 100, 176),  # the real run: 45,000 images at batch 512; the epochs decide
    (2, 2, 100, 100),  # a 2-epoch run on 1,500 images: the floor decides
    (0, 88, 100, 0),  # warmup_epochs=0 turns the warm-up off, floor or not
    (1, 7, 0, 7),  # no floor: as many steps as the epochs have
])
def test_warmup_length(epochs, steps_per_epoch, floor, expected):
    config = Config(optimizer="sgd", warmup_epochs=epochs, warmup_min_steps=floor, lr=0.2, batch_size=256)
    warmup = Warmup.of(config, steps_per_epoch)
    assert warmup.steps == expected and warmup.peak_lr == pytest.approx(0.1)


def test_warmup_ramps_linearly_and_then_leaves_the_rate_alone():
    warmup = Warmup(peak_lr=0.4, steps=4)
    assert [warmup.lr(s) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert warmup.lr(4) is None and warmup.lr(100) is None
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]},
                                 {"params": [nn.Parameter(torch.zeros(1))]}], lr=0.4)
    warmup.apply(optimizer, 1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2])
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = 0.08  # as the plateau would set it
    warmup.apply(optimizer, 4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.08, 0.08])
    assert not warmup.over_after(3) and warmup.over_after(4)


def test_weight_average_is_the_exponential_moving_average():
    torch.manual_seed(0)
    model = resnet18(width=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    expected = {k: v.clone() for k, v in start.items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v
    for k, v in average.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not any(p.requires_grad for p in average.module.parameters())
    assert not average.module.training


def test_weight_average_state_round_trips():
    model = resnet18(width=4)
    first = WeightAverage(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    first.update()
    second = WeightAverage(resnet18(width=4), 0.5)
    second.load_state_dict(first.state_dict())
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k


def test_weight_average_needs_a_decay_between_0_and_1():
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(resnet18(width=4), 1.0)


# --- the fused kernel, loss scaling and kernel flags across devices ----------------------------------
def _fp16_step(model, optimizer, scaler, x, y, overflow: bool = False) -> None:
    """One fp16 autocast step with loss scaling, as a T4 takes it; `overflow` puts an inf in a
    gradient, as a too-large loss scale does, so that the scaler skips the step."""
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if overflow:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(optimizer)
    scaler.update()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_the_optimizer_is_fused_with_zeroed_momentum_from_the_start():
    model = resnet18(width=4)
    optimizer = make_optimizer(model, Config(optimizer="sgd"), CPU)
    assert optimizer.defaults["fused"] and optimizer._step_supports_amp_scaling  # the scaler passes it tensors
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params)
    assert not make_optimizer(model, Config(optimizer="sgd", momentum=0.0), CPU).state  # no momentum, no buffers


def test_a_first_step_skipped_for_an_overflow_leaves_clean_momentum():
    # The fused kernel made the buffers with empty_like on the first step and returned before
    # writing them when that step was skipped: step 2 then started from uninitialised memory.
    torch.manual_seed(0)
    model = resnet18(width=4)
    fresh = copy.deepcopy(model)
    config = Config(optimizer="sgd", lr=0.4, batch_size=512)
    optimizer, scaler = make_optimizer(model, config, CPU), torch.amp.GradScaler("cpu")
    _fp16_step(model, optimizer, scaler, *_batch(1), overflow=True)
    assert scaler.get_scale() == 2.0 ** 15  # skipped: the scale halved, the weights did not move
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    _fp16_step(model, optimizer, scaler, *_batch(2))

    # The same step 2 from a run that never saw the skipped step, at the same scale.
    reference_optimizer = make_optimizer(fresh, config, CPU)
    _fp16_step(fresh, reference_optimizer, torch.amp.GradScaler("cpu", init_scale=2.0 ** 15), *_batch(2))
    for p, q in zip(model.parameters(), fresh.parameters()):
        buffer = optimizer.state[p]["momentum_buffer"]
        assert torch.isfinite(buffer).all()
        assert torch.equal(buffer, reference_optimizer.state[q]["momentum_buffer"])
        assert torch.equal(p, q)


def _saved_after_one_step(seed: int):
    """A model and its fused optimizer after one fp16 step (a checkpoint of them, as last.pt holds
    them), then the same model after a second, uninterrupted step: what a resume must reproduce."""
    torch.manual_seed(0)
    model = resnet18(width=4)
    config = Config(optimizer="sgd", lr=0.4, batch_size=512)
    batch = _batch(seed)
    optimizer = make_optimizer(model, config, CPU)
    _fp16_step(model, optimizer, torch.amp.GradScaler("cpu"), *batch)
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    _fp16_step(model, optimizer, torch.amp.GradScaler("cpu"), *batch)
    return config, batch, saved_model, saved_state, model


def test_a_state_saved_with_one_kernel_resumes_with_the_other():
    # load_state_dict restores the saved fused/foreach flags: a GPU run resumed where the optimizer
    # is built differently stepped with the other kernel, and with a GradScaler failed an assertion.
    config, batch, saved_model, saved_state, uninterrupted = _saved_after_one_step(3)
    resumed = copy.deepcopy(saved_model)  # a device without fused SGD builds a foreach optimizer
    foreach = torch.optim.SGD(param_groups(resumed, config.weight_decay), lr=config.peak_lr, momentum=0.9,
                              nesterov=True, foreach=True)
    load_optimizer_state(foreach, saved_state)
    assert all(g["fused"] is None and g["foreach"] for g in foreach.param_groups)
    _fp16_step(resumed, foreach, torch.amp.GradScaler("cpu"), *batch)
    for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    back = copy.deepcopy(saved_model)  # and the reverse: a foreach state into the fused optimizer
    fused_again = make_optimizer(back, config, CPU)
    load_optimizer_state(fused_again, foreach.state_dict())  # with plain load_state_dict: AssertionError
    assert all(g["fused"] and not g["foreach"] for g in fused_again.param_groups)
    _fp16_step(back, fused_again, torch.amp.GradScaler("cpu"), *batch)


def test_momentum_follows_the_parameters_memory_layout_on_resume():
    # A run saved contiguous and continued with channels_last (or the reverse): the buffers must
    # take the parameters' strides, element for element, before the fused kernel walks them together.
    config, batch, saved_model, saved_state, uninterrupted = _saved_after_one_step(4)
    nhwc = copy.deepcopy(saved_model).to(memory_format=torch.channels_last)
    nhwc_optimizer = make_optimizer(nhwc, config, CPU)
    load_optimizer_state(nhwc_optimizer, saved_state)
    for p in nhwc.parameters():
        assert nhwc_optimizer.state[p]["momentum_buffer"].stride() == p.stride()
    _fp16_step(nhwc, nhwc_optimizer, torch.amp.GradScaler("cpu"), *batch)
    for (name, p), q in zip(nhwc.named_parameters(), uninterrupted.parameters()):
        # fp16 gradients of the two layouts differ by ~2e-5; buffers in the wrong layout gave 7e-3.
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_and_adamw_step_as_torch_does_at_their_own_rate(name, kind):
    # Adam's rate is not scaled with the batch (SGD's is); momentum is its first beta; the decay
    # groups are SGD's; the step is torch's own unfused one, value for value.
    config = Config(optimizer=name, lr=1e-3, momentum=0.8, weight_decay=1e-2, batch_size=128)
    assert config.peak_lr == 1e-3 and Config(optimizer="sgd", lr=0.4, batch_size=128).peak_lr == pytest.approx(0.1)
    torch.manual_seed(0)
    model = resnet18(width=4)
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, config, CPU)
    assert type(optimizer) is kind and optimizer.defaults["fused"]
    assert optimizer.defaults["betas"] == (0.8, 0.999) and optimizer.defaults["lr"] == 1e-3
    plain = kind(param_groups(reference, 1e-2), lr=1e-3, betas=(0.8, 0.999), foreach=False)
    x, y = _batch(0)
    for _ in range(3):
        for m, opt in ((model, optimizer), (reference, plain)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for (name_, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name_)


def test_an_unknown_optimizer_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adam', 'adamw'\), got 'lamb'"):
        Config(optimizer="lamb")
