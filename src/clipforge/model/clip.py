"""The two-tower contrastive model: image tower + head, text tower + head, a learned temperature (and bias).

Names: the learned parameter is ``log_logit_scale``, log t; everywhere else in clipforge ``logit_scale`` is the
multiplier t itself (``CLIPOutput.logit_scale``, the losses' argument, ``predict_proba``), as in open_clip's
losses. The model has no ``logit_scale`` attribute on purpose: on open_clip's and Hugging Face's models
``model.logit_scale`` is the *log* parameter, so an attribute of that name holding t would silently take ``exp``
twice in code ported from them, and their in-place idioms (``model.logit_scale.clamp_(0, math.log(100))``,
``.fill_``, ``.requires_grad_(False)``) would change a temporary and do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.towers import Tower

_NO_LOGIT_SCALE = (
    "CLIPModel has no logit_scale: the learned parameter is log_logit_scale (log t), and the multiplier "
    "t = log_logit_scale.exp() is what forward(...).logit_scale holds and what the losses take"
)


@dataclass(eq=False)
class CLIPOutput:
    """What :meth:`CLIPModel.forward` returns (Hugging Face's field names).

    image_embeds: (B_img, D) L2-normalized image embeddings.
    text_embeds: (B_txt, D) L2-normalized text embeddings.
    logit_scale: 0-dim tensor, the multiplier t = exp(log_logit_scale), not its log.
    logit_bias: 0-dim tensor b for SigLIP models, None for CLIP models.

    The logits are computed when read, each time: a loss takes the embeddings, so training (chunked or spread
    over processes) never builds the (B_img, B_txt) matrix unless someone asks for it.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None

    @property
    def logits_per_image(self) -> torch.Tensor:
        """(B_img, B_txt) logits: l_ij = t * <image_i, text_j> (+ b)."""
        logits = self.logit_scale * self.image_embeds @ self.text_embeds.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    @property
    def logits_per_text(self) -> torch.Tensor:
        """(B_txt, B_img) logits: the transpose of :attr:`logits_per_image`."""
        return self.logits_per_image.T

    def __getitem__(self, key: str) -> NoReturn:
        # the output used to be a dict keyed image_features / text_features / logit_scale (then the log t)
        raise TypeError(
            f"CLIPOutput is a dataclass, not a dict: read output.image_embeds, .text_embeds, .logit_scale (the "
            f"multiplier t), .logit_bias or .logits_per_image, not output[{key!r}]"
        )


class CLIPModel(nn.Module):
    """Image and text towers projected into one embed space, compared by cosine similarity.

    logits_ij = t * <image_i, text_j> (+ b for SigLIP), t = exp(log_logit_scale), b = logit_bias, with both
    embeddings unit-norm. ``log_logit_scale`` is the learned parameter (log t; the trainer keeps it in
    [0, log 100]); the model has no ``logit_scale`` attribute (module docstring).

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
        init_log_logit_scale: float,
        init_logit_bias: float | None = None,
        locked_modules: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = image_head
        self.text_head = text_head
        self.log_logit_scale = nn.Parameter(torch.tensor(float(init_log_logit_scale)))
        if init_logit_bias is None:
            self.register_parameter("logit_bias", None)
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.locked_modules = tuple(locked_modules)
        # length buckets of the text tower's batches (train.text_buckets; 1 = one batch); not a parameter
        self.text_buckets = 1
        self.train(self.training)

    def __getattr__(self, name: str) -> Any:
        # nn.Module finds parameters and submodules here; only the old name gets a message that says what to use
        if name == "logit_scale":
            raise AttributeError(_NO_LOGIT_SCALE)
        return super().__getattr__(name)

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
        """images (B, 3, H, W) (or what the image tower's ``check_images`` accepts: a NaFlex tower's packed
        patches) -> embeddings (B, D); unit L2 norm unless ``normalize=False`` (raw projection)."""
        check = getattr(self.image_tower, "check_images", None)  # a Tower says what it takes
        if check is not None:
            check(images)
        elif images.ndim != 4 or images.shape[1] != 3:  # a plain module as the tower: images
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
        return self.project_text(self.text_features(input_ids, attention_mask), normalize)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's features (B, F) of a batch, the rows in :attr:`text_buckets` length buckets.

        With ``text_buckets`` = K > 1 the rows are ordered by token count (stable) and cut into K buckets, and each
        bucket runs the tower cut to its own longest row, so short captions stop paying for the longest one's
        padding (the text tower's forward + backward on clip art captions: 2.05x faster with 4 buckets on 2 CPU
        cores, benchmarks/finetune_speed.py); the rows come back in the batch's order. The same function: padding is
        masked out of every row's value, so a row does not depend on its neighbours beyond float rounding. Only for
        right-padded batches that have padding (otherwise one batch), and towers whose value of a row ignores its
        padding (``train.text_buckets`` is refused for the others before a run's first step,
        ``clipforge.distributed.wrap.prepare_model``).
        """
        buckets = min(self.text_buckets, len(input_ids) // 2)
        if buckets <= 1:
            return self.text_tower(input_ids, attention_mask)
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        if not right_padded or int(lengths.min()) == input_ids.shape[1]:
            return self.text_tower(input_ids, attention_mask)
        order = torch.argsort(lengths, stable=True)
        parts = []
        for rows in order.tensor_split(buckets):
            longest = max(1, int(lengths[rows].max()))
            parts.append(self.text_tower(input_ids[rows, :longest], attention_mask[rows, :longest]))
        return torch.cat(parts)[torch.argsort(order)]

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_tower_features: torch.Tensor | None = None,
        text_tower_features: torch.Tensor | None = None,
    ) -> CLIPOutput:
        """Embed a batch of images and a batch of texts into a :class:`CLIPOutput`.

        ``image_tower_features`` / ``text_tower_features``: a locked tower's features read from the feature
        cache; given, that tower is skipped and its inputs (``images``, or ``input_ids``/``attention_mask``)
        may be None.
        """
        if image_tower_features is not None:
            image_embeds = self.project_image(image_tower_features)
        else:
            image_embeds = self.encode_image(images)
        if text_tower_features is not None:
            text_embeds = self.project_text(text_tower_features)
        else:
            text_embeds = self.encode_text(input_ids, attention_mask)
        # t is taken inside forward, where DDP and FSDP see it; its gradient reaches log_logit_scale through exp
        return CLIPOutput(image_embeds, text_embeds, self.log_logit_scale.exp(), self.logit_bias)

    def generate_similarity_matrix(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B_img, B_txt) logits: t * image_embeds @ text_embeds.T (+ b if set), ``forward(...).logits_per_image``."""
        return self(images, input_ids, attention_mask).logits_per_image
