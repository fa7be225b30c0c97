"""The two-tower contrastive model: image tower + head, text tower + head, a learned temperature (and bias)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.towers import Tower


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

    Locked parts of the towers (``clipforge.model.locking``) have ``requires_grad=False`` parameters, and the
    submodules named in ``locked_modules`` (the maximal all-locked ones) stay in eval mode through ``train()``,
    so BatchNorm statistics and dropout do not drift there; the heads still train.

    The towers are :class:`~clipforge.model.towers.Tower` s: training, sharding and explanations ask them what
    they support rather than testing their class.
    """

    def __init__(
        self,
        image_tower: Tower,
        text_tower: Tower,
        image_head: nn.Module,
        text_head: nn.Module,
        init_logit_scale: float,
        init_logit_bias: float | None = None,
        locked_modules: Sequence[str] = (),
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
        self.locked_modules = tuple(locked_modules)
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIPModel:
        """Set train/eval mode; the ``locked_modules`` stay in eval mode whatever ``mode`` is."""
        super().train(mode)
        for name in self.locked_modules:
            self.get_submodule(name).eval()
        return self

    @property
    def image_locked(self) -> bool:
        """Whether no parameter of the image tower trains (its features are a fixed function of the pixels)."""
        return not any(p.requires_grad for p in self.image_tower.parameters())

    @property
    def text_locked(self) -> bool:
        """Whether no parameter of the text tower trains (its features are a fixed function of the tokens)."""
        return not any(p.requires_grad for p in self.text_tower.parameters())

    def project_image(self, tower_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image tower features (B, F) -> embeddings (B, D) through the head; training from cached features
        enters here, skipping the tower."""
        embeddings = self.image_head(tower_features)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def project_text(self, tower_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text tower features (B, F) -> embeddings (B, D) through the head (see :meth:`project_image`)."""
        embeddings = self.text_head(tower_features)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) -> embeddings (B, D); unit L2 norm unless ``normalize=False`` (raw projection)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (batch, 3, height, width), got {tuple(images.shape)}")
        # No torch.no_grad() for a frozen tower: autograd already skips it when no parameter needs a gradient,
        # and Grad-CAM needs gradients of its activations with respect to the input.
        return self.project_image(self.image_tower(images), normalize)

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
        return self.project_text(self.text_tower(input_ids, attention_mask), normalize)

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_tower_features: torch.Tensor | None = None,
        text_tower_features: torch.Tensor | None = None,
    ) -> CLIPOutput:
        """Embed a batch of images and a batch of texts; see :class:`CLIPOutput` for the keys.

        ``image_tower_features`` / ``text_tower_features``: a locked tower's features read from the feature
        cache; given, that tower is skipped and its inputs (``images``, or ``input_ids``/``attention_mask``)
        may be None.
        """
        if image_tower_features is not None:
            image_features = self.project_image(image_tower_features)
        else:
            image_features = self.encode_image(images)
        if text_tower_features is not None:
            text_features = self.project_text(text_tower_features)
        else:
            text_features = self.encode_text(input_ids, attention_mask)
        return {
            "image_features": image_features,
            "text_features": text_features,
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
