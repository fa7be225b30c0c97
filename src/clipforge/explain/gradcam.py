"""Grad-CAM for CNN image towers (torchvision, timm), with respect to the image-text similarity.

Grad-CAM (Selvaraju et al. 2017), with the similarity ``s = <image_embedding, text_embedding>`` (cosine) in
place of a class score. With ``A`` the (C, h, w) output of the tower's last convolutional block:

    alpha_c = mean_{i,j} ∂s/∂A_c[i, j]          (one weight per channel)
    map     = relu(sum_c alpha_c A_c)           (h, w), upsampled bilinearly to the input size

The block is the one the tower declares (``Tower.gradcam_block``: a hosted open_clip tower's last trunk stage,
before its attention pooling and projection), else found by module type, not by name: among the modules that
contain an ``nn.Conv2d``, the last one to finish in the forward pass whose output is a (B, C, h, w) map with
h * w > 1 (for a ResNet that is ``layer4``, for ConvNeXt/EfficientNet their last stage). A tower that still runs
modules holding ``nn.Linear`` layers after it (a ViT, whose only convolution is the patch embedding) is not a CNN,
and is refused, as is a declared block whose output is tokens; modules, not only ``nn.Linear`` calls, since a block
may apply its linears' weights functionally (clipforge's own transformer blocks do, through
``clipforge.model.cpu_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model import CLIPModel


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(child, nn.Conv2d) for child in module.modules())


def _runs_linear_layers_beside(module: nn.Module, block: nn.Module) -> bool:
    """``module`` holds an ``nn.Linear`` and is not ``block`` or one of the modules that contain it."""
    inner = list(module.modules())
    return any(isinstance(child, nn.Linear) for child in inner) and not any(child is block for child in inner)


class _Recorder:
    """Forward hooks that note, in order of completion, conv-block outputs and every module that ran."""

    def __init__(self, tower: nn.Module) -> None:
        self.blocks: list[tuple[nn.Module, torch.Tensor]] = []  # (module, its 4-D output)
        self.finished: list[nn.Module] = []  # every module, in the order it finished
        self.handles = []
        for module in tower.modules():
            if _contains_conv(module):
                self.handles.append(module.register_forward_hook(self._block_hook))
            self.handles.append(module.register_forward_hook(self._finished_hook))

    def _block_hook(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            self.blocks.append((module, output))

    def _finished_hook(self, module: nn.Module, inputs, output) -> None:
        self.finished.append(module)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _declared_block(tower: nn.Module, block: nn.Module, images: torch.Tensor):
    """Run ``tower`` and return (``block``, its output, the tower's output); the output must be a spatial map."""
    outputs = []
    handle = block.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        features = tower(images)
    finally:
        handle.remove()
    activation = outputs[-1] if outputs else None
    if (
        not isinstance(activation, torch.Tensor)
        or activation.ndim != 4
        or activation.shape[-1] * activation.shape[-2] < 2
    ):
        raise ValueError(
            f"{tower.describe()}'s last stage gives no (batch, channels, h, w) map: it is not a CNN, so Grad-CAM has "
            "nothing to weigh; explain needs a CNN image tower or the built-in ViT"
        )
    return block, activation, features


def last_conv_block(tower: nn.Module, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Run ``tower`` on ``images`` and return (its last conv block, that block's output, the tower's output).

    The block is the one the tower declares (``Tower.gradcam_block``), else found by module type (module docstring).
    Raises ``ValueError`` when the tower has no convolutional block with a spatial map, or runs modules holding
    ``nn.Linear`` layers after its last one (not a CNN).
    """
    declared = tower.gradcam_block() if hasattr(tower, "gradcam_block") else None
    if declared is not None:
        return _declared_block(tower, declared, images)
    recorder = _Recorder(tower)
    try:
        output = tower(images)
    finally:
        recorder.remove()
    if not recorder.blocks:
        if not _contains_conv(tower):  # a transformer without a class token (attention pooling, NaFlex)
            raise ValueError(
                f"{type(tower).__name__} has no convolutional block for Grad-CAM and no class-token attention for "
                "rollout: nothing to explain it by"
            )
        raise ValueError(
            f"{type(tower).__name__} has no convolutional block with a spatial output for Grad-CAM "
            f"(input {tuple(images.shape)}; a larger image may help)"
        )
    block, activation = recorder.blocks[-1]
    after = recorder.finished[max(i for i, m in enumerate(recorder.finished) if m is block) + 1 :]
    if any(_runs_linear_layers_beside(module, block) for module in after):
        raise ValueError(
            f"{type(tower).__name__} runs Linear layers after its last convolution ({type(block).__name__}): it is "
            "not a CNN, so Grad-CAM would explain its patch embedding only; use a CNN tower, or the built-in ViT"
        )
    return block, activation, output


def gradcam_maps(model: CLIPModel, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (B, N_text, H, W) at the input resolution, one per (image, text) pair, values >= 0.

    ``images``: preprocessed (B, 3, H, W); ``text_features``: (N_text, D) text embeddings.
    """
    text_features = F.normalize(text_features.detach().float().clone(), dim=-1)  # clone: may be an inference tensor
    maps = []
    with torch.enable_grad():
        # a graph through the input: a frozen tower has no parameter that would otherwise start one
        images = images.detach().requires_grad_(True)
        _, activation, features = last_conv_block(model.image_tower, images)
        image_features = F.normalize(model.image_head(features).float(), dim=-1)  # (B, D)
        for position in range(len(text_features)):
            similarity = (image_features @ text_features[position]).sum()  # images are independent in eval mode
            (gradient,) = torch.autograd.grad(similarity, activation, retain_graph=position + 1 < len(text_features))
            alpha = gradient.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
            cam = (alpha * activation.detach().float()).sum(dim=1).clamp(min=0)  # (B, h, w)
            maps.append(cam)
    stacked = torch.stack(maps, dim=1)  # (B, N_text, h, w)
    return F.interpolate(stacked, size=images.shape[-2:], mode="bilinear", align_corners=False)
