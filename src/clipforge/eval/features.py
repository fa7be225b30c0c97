"""Embeddings of a source's images and of any texts, for evaluation and search.

Batched under ``torch.inference_mode`` with the evaluation transform (resize + center crop) that the
model's config implies; images that fail to decode are skipped and reported, never fatal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from clipforge.data.base import DataError, ImageTextSource
from clipforge.data.loader import ImageTextDataset
from clipforge.data.samples import SkippedSample
from clipforge.data.tokenize import Tokenizer
from clipforge.data.transforms import build_image_transform
from clipforge.model import CLIPModel, resolve_image_preprocess


@dataclass
class ImageFeatures:
    """Normalized embeddings (N_ok, D) of the images that decoded, and their source indices."""

    features: torch.Tensor
    indices: np.ndarray
    skipped: list[SkippedSample]


def _model_device(model: CLIPModel) -> torch.device:
    return next(model.parameters()).device


def _collate_eval(samples: list) -> tuple[torch.Tensor | None, list[int], list[SkippedSample]]:
    kept = [(position, s) for position, s in samples if not isinstance(s, SkippedSample)]
    skipped = [s for _, s in samples if isinstance(s, SkippedSample)]
    images = torch.stack([pixels for _, (pixels, _) in kept]) if kept else None
    return images, [position for position, _ in kept], skipped


class _Indexed(torch.utils.data.Dataset):
    """Evaluation order over a source: item i is source image i, transformed deterministically."""

    def __init__(self, dataset: ImageTextDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[(index, 0)]


@torch.inference_mode()
def encode_source_images(
    model: CLIPModel,
    source: ImageTextSource,
    image_config,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> ImageFeatures:
    """Embed every image of ``source`` with the evaluation transform of ``image_config``."""
    transform = build_image_transform(resolve_image_preprocess(image_config), augment=None)
    loader = DataLoader(
        _Indexed(ImageTextDataset(source, transform)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_eval,
    )
    device = _model_device(model)
    features, indices, skipped = [], [], []
    for images, positions, bad in loader:
        skipped.extend(bad)
        if images is None:
            continue
        with autocast or contextlib.nullcontext():
            features.append(model.encode_image(images.to(device)).float())
        indices.extend(positions)
    if not features:
        raise DataError(
            f"none of the {len(source)} images could be read (first: {skipped[0].where}: {skipped[0].reason})"
        )
    return ImageFeatures(torch.cat(features), np.asarray(indices, dtype=np.int64), skipped)


@torch.inference_mode()
def encode_texts(
    model: CLIPModel,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    context_length: int,
    batch_size: int = 512,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """Normalized text embeddings (len(texts), D), in the order given.

    Each distinct string is encoded once and its row copied to every position that holds it, so identical
    texts get bit-identical embeddings whatever ``batch_size`` is. The reason: a batched forward pass may round
    a row differently depending on the rows beside it and the batch's padded length, and when two images
    share a caption, that noise, not the tie rule of the retrieval metrics, would decide which one ranks first.
    """
    distinct: dict[str, int] = {}
    positions = [distinct.setdefault(text, len(distinct)) for text in texts]  # (len(texts),) row of each text
    unique_texts = list(distinct)
    device = _model_device(model)
    parts = []
    for start in range(0, len(unique_texts), batch_size):
        input_ids, attention_mask = tokenizer(unique_texts[start : start + batch_size], context_length)
        with autocast or contextlib.nullcontext():
            parts.append(model.encode_text(input_ids.to(device), attention_mask.to(device)).float())
    features = torch.cat(parts)  # (num distinct texts, D)
    if len(unique_texts) == len(positions):
        return features
    return features[torch.as_tensor(positions, device=features.device)]
