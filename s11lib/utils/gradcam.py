"""Grad-CAM (Selvaraju et al., 2017): where in the image a layer's evidence for a class lies.

For a target class c and a convolutional layer with activations A (N, K, h, w):
weights = mean over (h, w) of d(logit_c)/dA, cam = ReLU(sum_k weights_k * A_k), upsampled
bilinearly to the input size. `GradCAM` owns its hooks: they are registered on entry and always
removed on exit, and exceptions are never swallowed. tests/test_gradcam.py checks the raw maps
against captum's LayerGradCam on the same model and images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s11lib.transforms import to_float


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` (e.g. "layer3" or "layer3.1"), or a one-line error listing the choices."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        choices = [n for n, _ in model.named_children()]
        raise ValueError(f"unknown gradcam_layer {name!r}; choose one of {choices} or a block such as 'layer3.1'") from None


class GradCAM:
    """Grad-CAM heatmaps for one layer of a model.

    Use as a context manager so the hooks are always removed::

        with GradCAM(model, "layer3") as cam:
            heatmaps = cam(images, targets)        # (N, H, W) in [0, 1]

    Args:
        model: the classifier; it is put in eval mode for the computation and restored after.
        layer: the name of the submodule whose output is explained.
    """

    def __init__(self, model: nn.Module, layer: str):
        self.model = model
        self.layer_name = layer
        self.layer = resolve_layer(model, layer)
        self._handles: list = []
        self._activations: torch.Tensor | None = None

    def __enter__(self) -> "GradCAM":
        self._handles.append(self.layer.register_forward_hook(self._keep_activations))
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        return None  # never swallow the caller's exception

    def release(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._activations = None

    def _keep_activations(self, module, inputs, output) -> None:
        self._activations = output

    def attribute(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps, before normalisation: ReLU(weighted activations) upsampled to the input size.

        Returns (cams (N, H, W) float32, targets (N,) int64); targets default to the predicted class.
        """
        if not self._handles:
            raise RuntimeError("use GradCAM inside a 'with' block (its hooks are not registered)")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                images = images.detach().requires_grad_(True)  # so the graph reaches the layer
                logits = self.model(images).float()
                if targets is None:
                    targets = logits.argmax(1)
                targets = targets.to(logits.device).long()
                activations = self._activations
                score = logits.gather(1, targets[:, None]).sum()
                (grads,) = torch.autograd.grad(score, activations)
        finally:
            self.model.train(was_training)
            self._activations = None
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations.detach().float()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return cam[:, 0], targets

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Heatmaps (N, H, W), each scaled to [0, 1] by its own min and max (all zero stays zero)."""
        cams, _ = self.attribute(images, targets)
        return normalize_maps(cams)


def normalize_maps(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] by its own min and max; a constant map becomes all zeros."""
    flat = cams.flatten(1)
    low = flat.min(1).values[:, None, None]
    span = (flat.max(1).values[:, None, None] - low)
    return torch.where(span > 0, (cams - low) / span.clamp_min(1e-12), torch.zeros_like(cams))


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5, cmap: str = "jet"):
    """Blend a [0, 1] heatmap (H, W), coloured with `cmap`, over an image (3, H, W) uint8 or [0, 1].

    Returns an (H, W, 3) float numpy array in [0, 1], ready for imshow.
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = to_float(image).permute(1, 2, 0).cpu().numpy()
    colour = colormaps[cmap](heatmap.detach().float().cpu().clamp(0, 1).numpy())[..., :3]
    return (1 - alpha) * rgb + alpha * colour
