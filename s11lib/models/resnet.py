"""ResNet18 for 32x32 inputs, with a pluggable norm layer (LayerNorm by default).

The CIFAR variant of He et al. (2016): a 3x3 stride-1 stem and no max-pool, so layer1 works at
32x32, layer2 at 16x16, layer3 at 8x8 and layer4 at 4x4. Layout and names follow kuangliu's
pytorch-cifar `models/resnet.py`; the forward pass is split into `forward_features` and
`forward_head` (as timm does) so that Grad-CAM and feature extraction have one place to hook.

"LayerNorm" here means what it means for conv nets: every sample is normalised over all of
(C, H, W) together, with a learned scale and shift per channel. `nn.GroupNorm(1, C)` is exactly
that; `nn.LayerNorm([C, H, W])` would also learn a separate scale per pixel, tying the model to
one input size. No BatchNorm is used anywhere, so a sample's output never depends on the other
samples in its batch.

Initialisation is part of the model (`ResNet.init_weights`), as in torchvision and timm: He
(Kaiming) normal for the convolutions, fan_out, for ReLU; norm scales 1 and shifts 0; and, on by
default, the last norm scale of every residual branch set to 0 (torchvision's
`zero_init_residual`, timm's `zero_init_last`), so that each block starts as its shortcut alone
and the network as a shallow one. Without BatchNorm the first steps lean on this: without it,
short warm-ups collapsed to chance (docs/recipe.md).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

NormLayer = Callable[[int], nn.Module]
INITS = ("kaiming", "torch")


class LayerNormCHW(nn.GroupNorm):
    """LayerNorm for conv nets: each sample normalised over (C, H, W), a scale and shift per channel.

    nn.GroupNorm with one group (layer_norm builds it so), named for what it computes: the model
    summary lists it as LayerNormCHW. Its output keeps autocast's dtype.

    Autocast runs group_norm in fp32 and returns fp32, so under bf16 or fp16 the ReLU, the
    residual add and the next convolution's input cast would all move fp32 tensors: twice the
    bytes of a step that GroupNorm already makes memory-bound. Here the norm runs in the autocast
    dtype; its kernels still accumulate the mean and variance in fp32 (acc_type), as timm's
    fast_group_norm relies on. Outside autocast it is nn.GroupNorm exactly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)


def layer_norm(num_channels: int) -> nn.Module:
    """Per-sample normalisation over (C, H, W) with a per-channel affine (GroupNorm, 1 group)."""
    return LayerNormCHW(1, num_channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (the ResNet18/34 block)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm_layer: NormLayer = layer_norm):
        super().__init__()
        # Convolutions feeding a norm layer need no bias: the norm's shift replaces it.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = norm_layer(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                norm_layer(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stem, four stages, global average pool, linear classifier.

    Args:
        block: the residual block class.
        num_blocks: blocks per stage, e.g. (2, 2, 2, 2) for ResNet18.
        num_classes: size of the output.
        norm_layer: a callable that takes a channel count and returns a norm module.
        width: channels of the stem and the first stage (64 in ResNet18; the later stages
            double it each time). Smaller only for quick tests: width 16 costs 1/16 the FLOPs.
        zero_init_residual: start the last norm scale of each residual branch at 0, so that
            every block is its shortcut at initialisation.
        init: "kaiming" (He normal, fan_out, ReLU, for the convolutions) or "torch" (each
            layer's PyTorch default, kept to reproduce older runs and for the recipe study).
    """

    def __init__(
        self,
        block: type[BasicBlock],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        norm_layer: NormLayer = layer_norm,
        width: int = 64,
        zero_init_residual: bool = True,
        init: str = "kaiming",
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.norm1 = norm_layer(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1, norm_layer)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2, norm_layer)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2, norm_layer)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2, norm_layer)
        self.linear = nn.Linear(width * 8 * block.expansion, num_classes)
        self.init_weights(zero_init_residual, init)

    @torch.no_grad()
    def init_weights(self, zero_init_residual: bool = True, init: str = "kaiming") -> None:
        """(Re)initialise every layer; see the module docstring. The classifier keeps PyTorch's
        default (uniform in +-1/sqrt(fan_in)), as in torchvision and timm."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if init == "kaiming":
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:
                    module.reset_parameters()
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.norm2.weight)

    def _make_layer(self, block, planes, num_blocks, stride, norm_layer) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, norm_layer))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: (N, 3, 32, 32) -> (N, 8 * width, 4, 4)."""
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and classifier: (N, C, h, w) -> (N, num_classes) logits."""
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet18(num_classes: int = 10, norm_layer: NormLayer = layer_norm, width: int = 64,
             zero_init_residual: bool = True, init: str = "kaiming") -> ResNet:
    """ResNet18 for CIFAR (11,173,962 parameters at width 64), LayerNorm unless told otherwise."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, norm_layer=norm_layer, width=width,
                  zero_init_residual=zero_init_residual, init=init)
