"""The optimiser's groups, the warm-up rule and the weight average (s11lib/optim.py)."""
import copy

import pytest
import torch
from torch import nn

from s11lib.config import Config
from s11lib.models import resnet18
from s11lib.optim import Warmup, WeightAverage, make_optimizer, param_groups

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
    (group,) = make_optimizer(model, Config(decay_norm_and_bias=True), CPU).param_groups
    assert _ids(group["params"]) == _ids(model.parameters()) and group["weight_decay"] == 5e-4


def test_norms_and_biases_are_not_decayed():
    # With zero gradients, a step moves a parameter only through its weight decay.
    torch.manual_seed(0)
    model = resnet18(width=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # no zero parameters, so decay would show everywhere
    before = copy.deepcopy(model)
    optimizer = make_optimizer(model, Config(lr=0.1, weight_decay=0.1, momentum=0.0, batch_size=512), CPU)
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
    config = Config(warmup_epochs=epochs, warmup_min_steps=floor, lr=0.2, batch_size=256)
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
