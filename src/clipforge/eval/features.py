"""Embeddings of a source's images and of any texts, for evaluation and search.

Batched under ``torch.inference_mode`` with the evaluation transform (resize + center crop) that the
model's config implies; images that fail to decode are skipped and reported, never fatal. On the CPU each
loader batch goes through the image tower in micro-batches of ``cpu_images_per_forward`` images (large CPU
forwards are slow, see ``clipforge.runtime.CPU_FORWARD_PIXELS``), so any ``batch_size`` runs at the pace of the
feature-cache builder.

A :class:`LockedTowerMemo` keeps the outputs of *locked* towers across calls (evaluation rounds during LiT
training): a locked tower is a fixed function of its input, so only the trainable heads run again.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from clipforge.data.base import DataError, ImageTextSource
from clipforge.data.loader import ImageTextDataset
from clipforge.data.processor import Processor
from clipforge.data.samples import SkippedSample
from clipforge.data.transforms import ImagePreprocess
from clipforge.model import CLIPModel
from clipforge.runtime import forward_in_cpu_chunks, usable_workers


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


class LockedTowerMemo:
    """Tower outputs (before the heads) of locked towers, kept across evaluation rounds, keyed by content.

    Valid only while the towers' weights do not change: the evaluator of one run holds one, and the functions
    below use it only when ``model.image_locked`` / ``model.text_locked``. Images are keyed by what the source
    holds (:func:`source_key`: a digest of every image's description, in order) and the whole preprocessing, so two
    sources opened from the same files share one entry and no two different sources can; texts by the string.
    Memory: one float32 row per image and per distinct text (1280 + 384 floats for the demo's towers).
    """

    def __init__(self) -> None:
        self.images: dict[tuple[str, ImagePreprocess], ImageFeatures] = {}  # (source key, preprocessing) -> rows
        self.texts: dict[str, torch.Tensor] = {}  # text -> (F,) tower features
        self.image_passes = 0  # how many times a tower actually ran over a source (tests read it)


def source_key(source: ImageTextSource) -> str:
    """A digest of what ``source`` holds: its length and every image's description (a path, a shard key, a
    built-in set's index), in order. Two sources over the same images get the same key, whatever objects they are."""
    digest = hashlib.sha256(str(len(source)).encode())
    for index in range(len(source)):
        digest.update(b"\0" + source.describe(index).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _tower_images(loader: DataLoader, device: torch.device, tower, autocast, total: int) -> ImageFeatures:
    """``tower(images)`` (B, F) for every readable image the loader yields, in micro-batches on the CPU."""
    features, indices, skipped = [], [], []
    for images, positions, bad in loader:
        skipped.extend(bad)
        if images is None:
            continue
        with autocast or contextlib.nullcontext():
            features.append(forward_in_cpu_chunks(tower, images, device))
        indices.extend(positions)
    if not features:
        raise DataError(f"none of the {total} images could be read (first: {skipped[0].where}: {skipped[0].reason})")
    return ImageFeatures(torch.cat(features), np.asarray(indices, dtype=np.int64), skipped)


@torch.inference_mode()
def encode_source_images(
    model: CLIPModel,
    source: ImageTextSource,
    processor: Processor,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
    memo: LockedTowerMemo | None = None,
) -> ImageFeatures:
    """Embed every image of ``source`` with ``processor``'s evaluation transform.

    ``memo``: with a locked image tower, its outputs for this source are computed once and kept there; later
    calls only run the head (the same embeddings as a full pass, up to float rounding).
    """
    preprocess = processor.preprocess
    loader = DataLoader(
        _Indexed(ImageTextDataset(source, processor.image_transform())),
        batch_size=batch_size,
        num_workers=usable_workers(num_workers),
        collate_fn=_collate_eval,
    )
    device = _model_device(model)
    if memo is None or not model.image_locked:
        return _tower_images(loader, device, model.encode_image, autocast, len(source))
    key = (source_key(source), preprocess)  # the whole rule: two resize rules of one size never share features
    if key not in memo.images:
        memo.images[key] = _tower_images(loader, device, model.image_tower, autocast, len(source))
        memo.image_passes += 1
    kept = memo.images[key]
    with autocast or contextlib.nullcontext():
        projected = model.project_image(kept.features.to(device)).float()
    return ImageFeatures(projected, kept.indices, kept.skipped)


@torch.inference_mode()
def encode_texts(
    model: CLIPModel,
    processor: Processor,
    texts: Sequence[str],
    batch_size: int = 512,
    autocast: contextlib.AbstractContextManager | None = None,
    memo: LockedTowerMemo | None = None,
) -> torch.Tensor:
    """Normalized text embeddings (len(texts), D), in the order given.

    ``memo``: with a locked text tower, each distinct text goes through the tower once across calls and is
    kept there; later calls only run the head.

    Each distinct string is encoded once and its row copied to every position that holds it, so identical
    texts get bit-identical embeddings whatever ``batch_size`` is. The reason: a batched forward pass may round
    a row differently depending on the rows beside it and the batch's padded length, and when two images
    share a caption, that noise, not the tie rule of the retrieval metrics, would decide which one ranks first.
    """
    distinct: dict[str, int] = {}
    positions = [distinct.setdefault(text, len(distinct)) for text in texts]  # (len(texts),) row of each text
    unique_texts = list(distinct)
    device = _model_device(model)
    if memo is not None and model.text_locked:
        missing = [text for text in unique_texts if text not in memo.texts]
        towered = encode_text_batches(model.text_tower, processor, missing, batch_size, device, autocast)
        memo.texts.update(zip(missing, towered, strict=True))
        with autocast or contextlib.nullcontext():
            kept = torch.stack([memo.texts[text] for text in unique_texts]).to(device)
            features = model.project_text(kept).float()
    else:
        features = encode_text_batches(model.encode_text, processor, unique_texts, batch_size, device, autocast)
    # features: (num distinct texts, D)
    if len(unique_texts) == len(positions):
        return features
    return features[torch.as_tensor(positions, device=features.device)]


# texts tokenized and ordered together by encode_text_batches: the token ids of this many are held at once
SORT_WINDOW = 8192


def encode_text_batches(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    processor: Processor,
    texts: Sequence[str],
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """``encode(input_ids, attention_mask)`` over ``texts`` in batches of at most ``batch_size``, batched by
    token count: (len(texts), F) float32 rows in the order given (an empty (0, 0) tensor for no texts).

    Each window of ``SORT_WINDOW`` texts is tokenized once and ordered by token count (stable, so ties keep
    their order), then cut into batches in that order, so each batch pads to the length of its own longest
    text. With the tokenizer's ``longest`` padding a batch of mixed captions otherwise pads every row to its
    longest one; on the demo's 12,798 training captions (mean 7.6 tokens, longest 32) sorting cuts the padded
    tokens 2.9x and the text tower's time more (its attention grows with the square of the length). A batch is
    the window's rows cut to the batch's longest, which is what tokenizing the batch alone gives (right padding,
    ``Tokenizer.__call__``); with ``max_length`` padding every batch keeps the context length. A row's value does
    not depend on its neighbours beyond float rounding: padding is masked out.
    """
    if not texts:
        return torch.empty(0, 0)
    parts, orders = [], []
    for window_start in range(0, len(texts), SORT_WINDOW):
        tokens = processor.text(list(texts[window_start : window_start + SORT_WINDOW]))
        input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = max(1, int(lengths[rows].max()))  # a tokenizer pads an all-empty batch to one position
            width = input_ids.shape[1] if processor.tokenizer.padding == "max_length" else longest
            with autocast or contextlib.nullcontext():
                batch = encode(input_ids[rows, :width].to(device), attention_mask[rows, :width].to(device))
            parts.append(batch.float())
        orders.append(order + window_start)
    features, order = torch.cat(parts), torch.cat(orders)
    restored = torch.empty_like(features)
    restored[order.to(features.device)] = features
    return restored
