"""The two-tower contrastive model: image tower + head, text tower + head, a learned temperature (and bias)."""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn


class CLIPOutput(TypedDict):
    """What ``CLIPModel.forward`` returns (a plain dict at run time).

    image_features: (B, D) L2-normalized image embeddings.
    text_features: (B, D) L2-normalized text embeddings.
    logit_scale: 0-dim tensor, the *log* of the temperature multiplier t (the loss uses t = exp(logit_scale)).
    logit_bias: 0-dim tensor b for SigLIP models, None for CLIP models.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


class CLIPModel(nn.Module):
    """Image and text towers projected into one embed space, compared by cosine similarity.

    logits_ij = exp(logit_scale) * <image_i, text_j> (+ logit_bias for SigLIP), with both embeddings unit-norm.

    Frozen towers (``freeze_image`` / ``freeze_text``) have ``requires_grad=False`` parameters and stay in
    eval mode through ``train()``, so BatchNorm statistics and dropout do not drift; their heads still train.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        image_head: nn.Module,
        text_head: nn.Module,
        init_logit_scale: float,
        init_logit_bias: float | None = None,
        freeze_image: bool = False,
        freeze_text: bool = False,
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = image_head
        self.text_head = text_head
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        if init_logit_bias is None:
            self.register_parameter("logit_bias", None)
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.freeze_image = freeze_image
        self.freeze_text = freeze_text
        for tower, frozen in ((image_tower, freeze_image), (text_tower, freeze_text)):
            if frozen:
                tower.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIPModel:
        """Set train/eval mode; frozen towers stay in eval mode whatever ``mode`` is."""
        super().train(mode)
        if self.freeze_image:
            self.image_tower.eval()
        if self.freeze_text:
            self.text_tower.eval()
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) -> embeddings (B, D); unit L2 norm unless ``normalize=False`` (raw projection)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (batch, 3, height, width), got {tuple(images.shape)}")
        # No torch.no_grad() for a frozen tower: autograd already skips it when no parameter needs a gradient,
        # and Grad-CAM needs gradients of its activations with respect to the input.
        embeddings = self.image_head(self.image_tower(images))
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """input_ids and attention_mask (B, L) -> embeddings (B, D); unit L2 norm unless ``normalize=False``."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        if input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        embeddings = self.text_head(self.text_tower(input_ids, attention_mask))
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> CLIPOutput:
        """Embed a batch of images and a batch of texts; see :class:`CLIPOutput` for the keys."""
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
        }

    def generate_similarity_matrix(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B_img, B_txt) logits: exp(logit_scale) * image_features @ text_features.T (+ logit_bias if set)."""
        image_features = self.encode_image(images)
        text_features = self.encode_text(input_ids, attention_mask)
        logits = self.logit_scale.exp() * image_features @ text_features.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits
