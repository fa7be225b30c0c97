"""Gradient (activation) checkpointing for every kind of tower.

Each tower keeps only the inputs of its blocks in the forward pass and recomputes the blocks' activations in
the backward pass: activation memory of one block instead of all of them, for about one extra forward.
Gradients are unchanged (the recomputation replays the same random state, so dropout masks agree).

Each tower says whether it can (:meth:`~clipforge.model.towers.Tower.set_grad_checkpointing`):

* built-in ViT and text transformer: :class:`~clipforge.model.transformer.Transformer` wraps each block in
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``;
* timm backbones: ``model.set_grad_checkpointing(True)`` (timm's own per-block checkpointing);
* Hugging Face encoders: ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before
  transformers 5) with ``use_reentrant=False``, where the model supports it;
* torchvision backbones have no such switch: they are reported back, and run without it.
"""

from __future__ import annotations

from clipforge.model.clip import CLIPModel

__all__ = ["enable_grad_checkpointing"]


def enable_grad_checkpointing(model: CLIPModel) -> list[str]:
    """Switch gradient checkpointing on in both towers of ``model``, in place.

    Returns the towers that do not support it (``"image tower (ResNet)"``...), which then run as before;
    towers without trainable parameters are skipped (nothing of theirs is kept for a backward pass).
    """
    unsupported = []
    for label, tower in (("image", model.image_tower), ("text", model.text_tower)):
        if not any(parameter.requires_grad for parameter in tower.parameters()):
            continue
        if not tower.set_grad_checkpointing(True):
            unsupported.append(f"{label} tower ({tower.describe()})")
    return unsupported
