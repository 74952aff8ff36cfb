"""Models: the CIFAR ResNet18 with LayerNorm."""
from s11lib.models.resnet import AutocastGroupNorm, BasicBlock, ResNet, layer_norm, resnet18

__all__ = ["AutocastGroupNorm", "BasicBlock", "ResNet", "layer_norm", "resnet18"]
