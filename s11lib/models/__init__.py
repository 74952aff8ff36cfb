"""Models: the CIFAR ResNet18 with LayerNorm."""
from s11lib.models.resnet import BasicBlock, LayerNormCHW, ResNet, layer_norm, resnet18

__all__ = ["BasicBlock", "LayerNormCHW", "ResNet", "layer_norm", "resnet18"]
