"""Heat maps for ViT image towers: attention rollout, and its text-conditioned, gradient-weighted variant.

**Attention rollout** (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"). With ``A_l`` the
attention of layer l (B, heads, T, T), heads averaged to ``Ā_l``, the residual connection is accounted for by
adding the identity and re-normalizing the rows:

    Â_l = rownorm(Ā_l + I)          (= 0.5 Ā_l + 0.5 I, since the rows of Ā_l sum to 1)
    R   = Â_L Â_{L-1} ... Â_1        (T, T): how much each input token flows into each output token

The map is the class token's row ``R[0, 1:]``, one value per patch, reshaped to the patch grid. It explains
the image embedding as a whole, so it is the same whatever the text.

**Text-conditioned rollout** (gradient-weighted attention, Chefer, Gur & Wolf 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"). With the
image-text similarity ``s = <image_embedding, text_embedding>`` (cosine), each layer's attention is weighted
by its gradient, keeping positive contributions only, and averaged over heads:

    Ā_l = mean_h relu(∂s/∂A_l ⊙ A_l)
    R   = (I + Ā_L) ... (I + Ā_1)    (Chefer's update R <- R + Ā_l R, starting from R = I; no row norm)

and the map is again ``R[0, 1:]``. Different texts give different gradients, hence different maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipforge.model import CLIPModel
from clipforge.model.towers import Tower


def attention_rollout(attentions: Sequence[torch.Tensor], row_normalize: bool = True) -> torch.Tensor:
    """R = Â_L ... Â_1 with Â_l = I + mean_h A_l, rows normalized to sum 1 when ``row_normalize``.

    attentions: per layer, in forward order, (B, heads, T, T) or (B, T, T) (heads already fused).
    Returns (B, T, T) float32. ``row_normalize=True`` is Abnar & Zuidema's rollout; ``False`` with
    gradient-weighted maps is Chefer et al.'s relevance update.
    """
    if not attentions:
        raise ValueError("need the attention of at least one layer")
    rollout = None
    for attention in attentions:
        fused = attention.float().mean(dim=1) if attention.ndim == 4 else attention.float()  # (B, T, T)
        if fused.ndim != 3 or fused.shape[-1] != fused.shape[-2]:
            raise ValueError(f"attention must be (B, heads, T, T) or (B, T, T), got {tuple(attention.shape)}")
        step = fused + torch.eye(fused.shape[-1], device=fused.device)
        if row_normalize:
            step = step / step.sum(dim=-1, keepdim=True)
        rollout = step if rollout is None else step @ rollout
    return rollout


def class_token_map(rollout: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, T, T) rollout -> (B, grid, grid): the class token's row over the patches (token 0 = class)."""
    patches = rollout[:, 0, 1:]
    if patches.shape[-1] != grid_size * grid_size:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not form a {grid_size} x {grid_size} grid")
    return patches.reshape(-1, grid_size, grid_size)


def gradient_weighted(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer mean_h relu(grad ⊙ attention): (B, heads, T, T) pairs -> (B, T, T)."""
    return [
        (gradient * attention).clamp(min=0).float().mean(dim=1)
        for attention, gradient in zip(attentions, gradients, strict=True)
    ]


def has_patch_attention(tower: Tower) -> bool:
    """Whether ``tower`` gives attention maps over a class token and a patch grid (the built-in ViT does)."""
    return tower.supports_attention_maps and tower.grid_size is not None


def vit_tower(model: CLIPModel) -> Tower:
    """The image tower, which must give attention maps over a class token and a patch grid (the built-in ViT)."""
    tower = model.image_tower
    if not has_patch_attention(tower):
        raise TypeError(
            f"attention rollout needs an image tower with attention maps over a patch grid (the built-in ViT, "
            f"model.image.kind='vit'), not {tower.describe()}"
        )
    return tower


def rollout_maps(model: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """Plain rollout maps (B, grid, grid) of preprocessed images (B, 3, S, S); the text plays no part."""
    tower = vit_tower(model)
    with torch.no_grad():
        _, attentions = tower.forward_with_attention(images)
    return class_token_map(attention_rollout(attentions), tower.grid_size)


def text_conditioned_maps(model: CLIPModel, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted rollout maps (B, N_text, grid, grid), one per (image, text) pair.

    ``text_features``: (N_text, D) text embeddings (normalized or not; only their direction matters).
    One forward pass over the images, one backward pass per text: the images of a batch do not interact
    (no batch statistics in the ViT), so the gradient of the summed similarities gives each image its own.
    """
    tower = vit_tower(model)
    text_features = F.normalize(text_features.detach().float().clone(), dim=-1)  # clone: may be an inference tensor
    maps = []
    with torch.enable_grad():
        # a graph through the input: a frozen tower has no parameter that would otherwise start one
        images = images.detach().requires_grad_(True)
        features, attentions = tower.forward_with_attention(images)
        # encode_image's head + normalization, applied to the tower output we hold the attentions of
        image_features = F.normalize(model.image_head(features).float(), dim=-1)  # (B, D)
        for position in range(len(text_features)):
            similarity = (image_features @ text_features[position]).sum()
            gradients = torch.autograd.grad(similarity, attentions, retain_graph=position + 1 < len(text_features))
            weighted = gradient_weighted([a.detach() for a in attentions], gradients)
            rollout = attention_rollout(weighted, row_normalize=False)
            maps.append(class_token_map(rollout, tower.grid_size))
    return torch.stack(maps, dim=1)
