"""Gradient (activation) checkpointing for every kind of tower.

Each tower keeps only the inputs of its blocks in the forward pass and recomputes the blocks' activations in
the backward pass: activation memory of one block instead of all of them, for about one extra forward.
Gradients are unchanged (the recomputation replays the same random state, so dropout masks agree).

* built-in ViT and text transformer: :class:`~clipforge.model.transformer.Transformer` wraps each block in
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``;
* timm backbones: ``model.set_grad_checkpointing(True)`` (timm's own per-block checkpointing);
* Hugging Face encoders: ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before
  transformers 5) with ``use_reentrant=False``, where the model supports it;
* torchvision backbones have no such switch: they are reported back, and run without it.
"""

from __future__ import annotations

from torch import nn

from clipforge.model.clip import CLIPModel
from clipforge.model.text import HFTextEncoder, TextTransformer
from clipforge.model.transformer import Transformer
from clipforge.model.vision import BackboneTower, VisionTransformer

__all__ = ["enable_grad_checkpointing"]


def _enable(tower: nn.Module) -> bool:
    """Switch checkpointing on in one tower; False when the tower cannot do it."""
    if isinstance(tower, VisionTransformer | TextTransformer):
        transformer: Transformer = tower.transformer
        transformer.grad_checkpointing = True
        return True
    if isinstance(tower, HFTextEncoder):
        if not getattr(tower.encoder, "supports_gradient_checkpointing", False):
            return False
        options = {"use_reentrant": False}
        if hasattr(tower.encoder, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
            tower.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            tower.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        return True
    if isinstance(tower, BackboneTower):
        switch = getattr(tower.backbone, "set_grad_checkpointing", None)  # timm models have it
        if switch is None:
            return False
        try:
            switch(True)
        except (AssertionError, NotImplementedError):  # timm's way of saying "not for this architecture"
            return False
        return True
    return False


def enable_grad_checkpointing(model: CLIPModel) -> list[str]:
    """Switch gradient checkpointing on in both towers of ``model``, in place.

    Returns the towers that do not support it (``"image tower (ResNet)"``...), which then run as before;
    towers without trainable parameters are skipped (nothing of theirs is kept for a backward pass).
    """
    unsupported = []
    for label, tower in (("image", model.image_tower), ("text", model.text_tower)):
        if not any(parameter.requires_grad for parameter in tower.parameters()):
            continue
        if not _enable(tower):
            inner = getattr(tower, "backbone", None) or getattr(tower, "encoder", None) or tower
            unsupported.append(f"{label} tower ({type(inner).__name__})")
    return unsupported
