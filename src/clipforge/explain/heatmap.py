"""``clipforge explain``: one heat map per (image, text) pair, by the method the image tower allows.

Methods: ``attention-gradient`` (built-in ViT, text-conditioned rollout), ``rollout`` (built-in ViT, plain
attention rollout: the same map for every text), ``gradcam`` (CNN towers); ``auto`` picks
``attention-gradient`` for the built-in ViT and ``gradcam`` otherwise. See ``rollout.py`` and ``gradcam.py``
for the formulas.

Maps are returned at the resolution of the square the model saw (the evaluation transform resizes the short
side and crops the center), scaled to [0, 1] per map, together with that same square of the original image,
so an overlay lines up pixel for pixel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.config.choices import EXPLAIN_METHODS
from clipforge.data.base import decode_image
from clipforge.data.transforms import ImagePreprocess, eval_view_box
from clipforge.eval.features import encode_texts
from clipforge.explain.gradcam import gradcam_maps
from clipforge.explain.rollout import has_patch_attention, rollout_maps, text_conditioned_maps
from clipforge.model.factory import LoadedModel

METHODS = EXPLAIN_METHODS


@dataclass
class Explanation:
    """The heat map (h, w) in [0, 1] of ``text`` on ``image`` (the center square the model saw)."""

    image: Image.Image
    text: str
    heatmap: np.ndarray
    method: str
    similarity: float


def resolve_method(loaded: LoadedModel, method: str = "auto") -> str:
    """``auto`` -> the method the image tower allows; an explicit method is checked against the tower."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {list(METHODS)}")
    tower = loaded.model.image_tower
    has_attention = has_patch_attention(tower)
    if method == "auto":
        return "attention-gradient" if has_attention else "gradcam"
    if method in ("attention-gradient", "rollout") and not has_attention:
        raise ValueError(
            f"method={method!r} needs an image tower with attention maps (the built-in ViT), not "
            f"{tower.describe()}; use 'gradcam' for this model"
        )
    return method


def model_view(image: Image.Image, preprocess: ImagePreprocess) -> Image.Image:
    """The part of ``image`` the model sees through ``preprocess``, at full resolution: the whole image for a
    squash resize, the region of the center crop for a shortest-edge resize (``eval_view_box``). A heat map is
    drawn over exactly this."""
    left, top, right, bottom = eval_view_box(preprocess, image.width, image.height)
    return image.crop((round(left), round(top), round(right), round(bottom)))


def _scale(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map scaled to [0, 1] by its own maximum (an all-zero map stays zero)."""
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp(min=1e-12)).reshape(maps.shape)


def explain(
    loaded: LoadedModel,
    images: Sequence[str | os.PathLike | Image.Image],
    texts: Sequence[str],
    method: str = "auto",
) -> list[list[Explanation]]:
    """Heat maps of every text on every image: ``result[i][t]`` for image i and text t."""
    if not images or not texts:
        raise ValueError("explain needs at least one image and one text")
    method = resolve_method(loaded, method)
    model = loaded.model
    processor = loaded.processor
    originals = [image if isinstance(image, Image.Image) else decode_image(image) for image in images]
    device = next(model.parameters()).device
    pixels = processor.images(originals).to(device)
    text_features = encode_texts(model, processor, list(texts))
    if method == "gradcam":
        maps = gradcam_maps(model, pixels, text_features)
    elif method == "attention-gradient":
        maps = text_conditioned_maps(model, pixels, text_features)
    else:
        maps = rollout_maps(model, pixels)[:, None].expand(-1, len(texts), -1, -1)
    size = pixels.shape[-1]
    maps = _scale(F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)).cpu()
    with torch.inference_mode():
        similarities = (model.encode_image(pixels).float() @ text_features.T).cpu()  # (B, N_text) cosine
    return [
        [
            Explanation(
                model_view(original, processor.preprocess), text, maps[i, t].numpy(), method, float(similarities[i, t])
            )
            for t, text in enumerate(texts)
        ]
        for i, original in enumerate(originals)
    ]
