"""The tower interface: what every image or text tower tells the code that trains, shards and explains it.

Callers ask the tower instead of testing its class, so a new family (a Hugging Face vision model, an open_clip
tower) is one subclass that answers these questions, and no caller changes:

* ``output_dim``: the width of the features ``forward`` returns, ``(batch, output_dim)``: what the head takes.
* :meth:`Tower.check_images`: whether a batch is what this image tower takes ((B, 3, H, W) pixels by default).
* :meth:`Tower.set_grad_checkpointing`: recompute block activations in the backward pass; False = unsupported.
* :meth:`Tower.sharding_units`: the blocks FSDP shards one by one (empty: the whole tower is one unit).
* :attr:`Tower.supports_attention_maps` / :meth:`Tower.forward_with_attention`: per-layer attention weights for
  explanations. An *image* tower that supports them attends over ``[class token, patch_1 .. patch_{g*g}]``,
  patches in row-major order on a ``grid_size x grid_size`` grid.
* :meth:`Tower.gradcam_block`: the block whose (B, C, h, w) output Grad-CAM weighs, where the tower knows it
  better than a search by module type (a trunk followed by attention pooling); None: searched.
* :meth:`Tower.describe`: the tower in a message, e.g. ``ResNet`` or ``BertModel``.
* :meth:`Tower.hf_config_json`: the Hugging Face config that rebuilds the tower offline (checkpoints store it).
* :meth:`Tower.adapter_targets`: the linear maps LoRA adapts, by role (``clipforge.model.lora``).

The defaults describe the most limited tower (no checkpointing, one sharding unit, no attention maps), so a
subclass overrides only what it can do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clipforge.model.lora import role_targets

__all__ = ["Tower"]


class Tower(nn.Module):
    """Base class of every tower: an ``nn.Module`` whose ``forward`` gives features ``(batch, output_dim)``.

    Image towers take images ``(batch, 3, H, W)``; text towers take ``(input_ids, attention_mask)``, both
    ``(batch, length)``. See the module docstring for what each method promises.
    """

    output_dim: int
    #: the side of the patch grid of an image tower with attention maps (None: no such grid)
    grid_size: int | None = None

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError naming the expected layout unless ``images`` is what this image tower takes: (B, 3, H, W)
        pixels (a tower with another input layout, e.g. NaFlex's packed patches, says its own)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (batch, 3, height, width), got {tuple(images.shape)}")

    def set_grad_checkpointing(self, enabled: bool = True) -> bool:
        """Switch activation checkpointing of the tower's blocks on (or off); False when the tower cannot.

        Gradients are unchanged; only the memory/compute trade differs (``clipforge.model.grad_checkpointing``).
        """
        return False

    def sharding_units(self) -> list[nn.Module]:
        """The submodules FSDP shards one by one, in forward order, before it shards the rest of the tower.

        Empty (the default): the tower is one unit, gathered whole for its forward pass.
        """
        return []

    @property
    def supports_attention_maps(self) -> bool:
        """Whether :meth:`forward_with_attention` returns the attention weights of every layer."""
        return False

    @property
    def ignores_padding(self) -> bool:
        """A text tower: whether a row's features are the same however many padding positions follow its last real
        token (so a batch may be cut to any length that keeps every real token: ``train.text_buckets``)."""
        return False

    def forward_with_attention(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward``'s features plus the attention weights of each layer, in forward order, each
        ``(batch, heads, T, T)`` with rows summing to 1; only where :attr:`supports_attention_maps`."""
        raise TypeError(f"{self.describe()} does not return attention maps")

    def gradcam_block(self) -> nn.Module | None:
        """The block whose output Grad-CAM weighs (it must give a (B, C, h, w) map); None: the last convolutional
        block, found by module type (``clipforge.explain.gradcam``)."""
        return None

    def describe(self) -> str:
        """The tower in a message: the class that does the work (the library model inside a wrapper)."""
        return type(self).__name__

    def hf_config_json(self) -> str | None:
        """The JSON of the Hugging Face config that rebuilds this tower without the hub; None for other towers."""
        return None

    def adapter_targets(self, roles: Sequence[str]) -> list[str]:
        """The names (within the tower) of the linear maps LoRA adapts for ``roles`` (``attention``, ``mlp``).

        The default reads the module names inside the tower's numbered blocks (:func:`clipforge.model.lora.
        role_targets`); a tower whose names say nothing of their role lists its own.
        """
        return role_targets(self, roles)


class TransformerTower(Tower):
    """A tower whose blocks are a :class:`~clipforge.model.transformer.Transformer` at ``self.transformer`` (the
    built-in ViT and text transformer): checkpointing switches it, and FSDP shards its blocks one by one."""

    transformer: nn.Module

    def set_grad_checkpointing(self, enabled: bool = True) -> bool:
        self.transformer.grad_checkpointing = enabled
        return True

    def sharding_units(self) -> list[nn.Module]:
        return list(self.transformer.blocks)
