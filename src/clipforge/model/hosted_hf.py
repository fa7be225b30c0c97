"""Hugging Face vision models hosted as towers: what clipforge's built-in ViT cannot express runs as transformers'
own module behind the :class:`~clipforge.model.towers.Tower` interface.

* ``naflex``: SigLIP 2's NaFlex ViT (:class:`NaFlexVisionTower`), transformers' ``Siglip2VisionModel``. Each image
  keeps its aspect ratio: a patch grid of its own shape, position embeddings resized to that grid, a padding mask in
  every attention layer and in the attention-pooling head. The built-in ViT takes square images of one size, so
  this tower is hosted rather than converted. Its architecture comes from the clipforge config alone
  (:func:`naflex_vision_config`), so a checkpoint rebuilds it offline.

Also here: the activation names both libraries use (:data:`HF_ACTIVATIONS`) and the switch of transformers' own
gradient checkpointing (:func:`set_hf_grad_checkpointing`), which the hosted text tower uses too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipforge.config import BUILTIN_VIT_IMAGE_SIZE, ImageTowerConfig
from clipforge.data.hf_loading import quiet_transformers
from clipforge.data.naflex import packed_width, unpack
from clipforge.model.towers import Tower

# Hugging Face hidden_act -> clipforge act (the inverse is what an export writes)
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}
CLIPFORGE_TO_HF_ACTIVATIONS = {ours: theirs for theirs, ours in HF_ACTIVATIONS.items()}


def set_hf_grad_checkpointing(model: nn.Module, enabled: bool = True) -> bool:
    """Switch a transformers model's own activation checkpointing (non-reentrant); False where it has none."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_disable()
    return True


def naflex_vision_config(cfg: ImageTowerConfig) -> Any:
    """The ``Siglip2VisionConfig`` of the NaFlex tower ``cfg`` describes: the ViT fields (``width``, ``depth``,
    ``heads``, ``mlp_ratio``, ``act``, ``norm_eps``, ``patch_size``) and a learned position table of
    (``image_size`` / ``patch_size``)^2 entries, resized to each image's grid."""
    from transformers import Siglip2VisionConfig

    grid = (cfg.image_size or BUILTIN_VIT_IMAGE_SIZE) // cfg.patch_size
    with quiet_transformers():
        return Siglip2VisionConfig(
            hidden_size=cfg.width,
            intermediate_size=int(round(cfg.width * cfg.mlp_ratio)),
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads,
            num_channels=3,
            num_patches=grid * grid,
            patch_size=cfg.patch_size,
            hidden_act=CLIPFORGE_TO_HF_ACTIVATIONS[cfg.act],
            layer_norm_eps=cfg.norm_eps,
            vision_use_head=True,
        )


class NaFlexVisionTower(Tower):
    """SigLIP 2's NaFlex ViT, hosted: transformers' ``Siglip2VisionModel`` at ``self.model`` (its parameter names
    under ``image_tower.model.``).

    images: packed NaFlex images (B, max_num_patches, patch_size^2 * 3 + 3) from the model's processor
    (:mod:`clipforge.data.naflex`) -> the attention-pooled features (B, width), padding patches masked out.
    Checkpointing is transformers' own; FSDP shards the encoder layers one by one. No attention maps: attention
    pooling has no class token to explain.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import Siglip2VisionModel

        with quiet_transformers():
            self.model = Siglip2VisionModel(config)
        self.patch_size = int(config.patch_size)
        self.output_dim = int(config.hidden_size)

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 3 or images.shape[-1] != packed_width(self.patch_size):
            raise ValueError(
                f"this NaFlex tower takes packed patches (batch, max_num_patches, {packed_width(self.patch_size)}) "
                f"from its processor (clipforge.data.naflex), got {tuple(images.shape)}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Packed images (B, N, p^2 * 3 + 3) -> features (B, width)."""
        self.check_images(images)
        pixel_values, pixel_attention_mask, spatial_shapes = unpack(images)
        output = self.model(
            pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes
        )
        return output.pooler_output

    def set_grad_checkpointing(self, enabled: bool = True) -> bool:
        return set_hf_grad_checkpointing(self.model, enabled)

    def sharding_units(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def describe(self) -> str:
        return type(self.model).__name__


def build_naflex_tower(cfg: ImageTowerConfig) -> NaFlexVisionTower:
    """The NaFlex tower ``cfg`` describes, at random (imported or trained weights follow); ``pretrained`` must be
    null: its weights come from a ``hf:`` import or a clipforge checkpoint."""
    if cfg.pretrained is not None:
        raise ValueError(
            f"model.image.pretrained={cfg.pretrained!r}: the NaFlex tower has no weights of its own; import a "
            "SigLIP 2 model (model.init: hf:FOLDER) or load a clipforge checkpoint"
        )
    return NaFlexVisionTower(naflex_vision_config(cfg))
