"""s11lib: the LayerNorm ResNet18 CIFAR-10 recipe, and the pictures that show why it errs."""

__version__ = "0.1.0"
