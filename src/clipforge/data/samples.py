"""One sample's journey into a batch: its seed, its training view and caption, and the collated batch.

Every random choice made for a sample (its crop, its caption) is drawn from a generator seeded by
``(seed, epoch, index)``, never from a worker's global RNG, so it does not depend on which worker loads it or
on how many workers there are. ``caption_sampling="cycle"`` instead takes caption ``visit mod n`` on the
image's ``visit``-th visit. Every loader (map-style, shards, cached features) builds on these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from clipforge.data.processor import Processor


MASK63 = (1 << 63) - 1


CAPTION_SAMPLING = ("random", "cycle")


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """A 63-bit seed for one visit of one sample, well mixed from its parts.

    ``repeat`` numbers the visits of one image within one epoch (a weighted sampler may draw an image
    twice); the first visit (0) has the seed of ``(seed, epoch, index)`` alone.
    """
    parts = [seed, epoch, index] + ([repeat] if repeat else [])
    return int(np.random.SeedSequence(parts).generate_state(2, dtype=np.uint64)[0]) & MASK63


class SampleKey(NamedTuple):
    """What the sampler hands the dataset: the image, the seed of this visit, and the visit number
    (how many times the image was drawn before, over all ranks and all earlier epochs)."""

    index: int
    seed: int
    visit: int = 0


@dataclass
class SkippedSample:
    """A sample whose image could not be read: kept in the batch's bookkeeping, not in its tensors."""

    where: str
    reason: str


def prepare_sample(
    image: Image.Image,
    captions: Sequence[str],
    seed: int,
    transform: Callable,
    caption_sampling: str = "random",
    visit: int = 0,
) -> tuple[torch.Tensor, str]:
    """The training view of one visit of an image: its transformed pixels and one of its captions.

    Used by every loader (map-style and shards). The transform's randomness and the ``random`` caption
    choice come from ``seed`` alone; ``cycle`` takes caption ``visit mod n``.
    """
    # fork_rng: the transform draws from torch's global CPU RNG; seed it for this sample only and
    # give the caller (the training process when num_workers=0) its RNG state back untouched.
    # default_generator, not torch.manual_seed: that also queues a seed for every lazy accelerator
    # backend (CUDA, XPU, MTIA), formatting a stack trace each time: 0.35 ms per sample, about 7%.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        pixels = transform(image)
    return pixels, captions[caption_choice(len(captions), seed, caption_sampling, visit)]


def caption_choice(num_captions: int, seed: int, caption_sampling: str = "random", visit: int = 0) -> int:
    """Which of an image's ``num_captions`` captions a visit uses: ``cycle`` -> ``visit mod n``; ``random`` -> a
    draw from ``seed`` (the cached-feature loader makes the same choice, so both paths see the same pairs)."""
    if caption_sampling == "cycle":
        return visit % num_captions
    return int(np.random.default_rng(seed).integers(num_captions))


@dataclass
class Batch:
    """A collated batch: images (B, 3, H, W), input_ids and attention_mask (B, L).

    A tower whose features come from the feature cache (``clipforge.data.feature_cache``) has its inputs
    replaced by them: ``image_features`` (B, F_image) instead of ``images``, ``text_features`` (B, F_text)
    instead of ``input_ids``/``attention_mask`` (those are then None).
    """

    images: torch.Tensor | None
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    skipped: list[SkippedSample] = field(default_factory=list)
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None

    _TENSORS = ("images", "input_ids", "attention_mask", "image_features", "text_features")

    def __len__(self) -> int:
        return (self.images if self.images is not None else self.image_features).shape[0]

    @property
    def device(self) -> torch.device:
        return (self.images if self.images is not None else self.image_features).device

    def tower_features(self) -> dict[str, torch.Tensor]:
        """The cached tower features as keyword arguments of ``CLIPModel.forward`` (empty when none)."""
        cached = {"image_tower_features": self.image_features, "text_tower_features": self.text_features}
        return {key: value for key, value in cached.items() if value is not None}

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        values = {name: getattr(self, name) for name in self._TENSORS}
        return Batch(skipped=self.skipped, **{name: None if t is None else function(t) for name, t in values.items()})

    def pin_memory(self) -> Batch:
        return self._map(lambda tensor: tensor.pin_memory())

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def split(self, parts: int) -> list[Batch]:
        """``parts`` micro-batches of consecutive rows (``tensor_split``: sizes differ by at most one)."""
        columns = {
            name: getattr(self, name).tensor_split(parts) if getattr(self, name) is not None else [None] * parts
            for name in self._TENSORS
        }
        return [Batch(**{name: columns[name][part] for name in self._TENSORS}) for part in range(parts)]


class Collator:
    """Stacks images and tokenizes captions (the model's processor) in the loader worker."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    def __call__(self, samples: Sequence[tuple[torch.Tensor, str] | SkippedSample]) -> Batch:
        skipped = [s for s in samples if isinstance(s, SkippedSample)]
        good = [s for s in samples if not isinstance(s, SkippedSample)]
        if not good:
            # a whole batch of unreadable images: an empty batch the trainer counts and moves past
            return Batch(
                torch.empty(0), torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long), skipped
            )
        images = torch.stack([pixels for pixels, _ in good])
        tokens = self.processor.text([caption for _, caption in good])
        return Batch(images, tokens["input_ids"], tokens["attention_mask"], skipped)
