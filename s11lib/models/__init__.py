"""Models: the CIFAR ResNet18 with LayerNorm."""
from s11lib.models.resnet import BasicBlock, ResNet, layer_norm, resnet18

__all__ = ["BasicBlock", "ResNet", "layer_norm", "resnet18"]
