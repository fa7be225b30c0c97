"""From a source of (image, captions) to batches: resumable sampling, per-sample seeds, collation.

Exact resume rests on two rules:

* The sampler is a pure function of ``(seed, samples already consumed)``: epoch ``e`` visits a
  permutation seeded by ``(seed, e)``, and epochs follow each other without a break, so the sample
  at any position of the stream is known without replaying the ones before it.
* Every random choice made for a sample (its crop, its caption) is drawn from a generator seeded by
  ``(seed, epoch, index)``, never from a worker's global RNG, so it does not depend on which worker
  loads it or on how many workers there are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clipforge.data.sources import ImageLoadError, ImageTextSource
from clipforge.data.tokenize import Tokenizer

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one visit of one sample, well mixed from its three parts."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0]) & _MASK63


class ResumableSampler(Sampler):
    """An endless stream of ``(index, sample_seed)`` for this rank, starting at ``start``.

    Epoch ``e`` is the permutation of ``range(num_samples)`` drawn from ``(seed, e)``; rank ``r`` of
    ``world_size`` takes every ``world_size``-th element from offset ``r`` (ranks see disjoint parts of
    every epoch; the ``num_samples % world_size`` leftover samples of a permutation are skipped that
    epoch). ``start`` counts this rank's samples already consumed, across epochs.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if num_samples < world_size:
            raise ValueError(f"cannot split {num_samples} samples over {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.num_samples = num_samples
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.per_rank = num_samples // world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in visiting order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1 & _MASK63))
            order = torch.randperm(self.num_samples, generator=generator).numpy()
        else:
            order = np.arange(self.num_samples)
        return order[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = divmod(self.start, self.per_rank)
        while True:
            order = self.epoch_order(epoch)
            for index in order[position:]:
                yield int(index), sample_seed(self.seed, epoch, int(index))
            epoch, position = epoch + 1, 0


@dataclass
class SkippedSample:
    """A sample whose image could not be read: kept in the batch's bookkeeping, not in its tensors."""

    where: str
    reason: str


class ImageTextDataset(Dataset):
    """Map-style dataset over a source; ``dataset[(index, seed)]`` -> ``(image, caption)``.

    The image is transformed and one of the image's captions is chosen at random, both from a
    generator seeded by ``seed`` (the sampler's per-visit seed). An image that fails to load gives a
    :class:`SkippedSample` instead of raising, so one bad file never stops a run.
    """

    def __init__(self, source: ImageTextSource, transform: Callable) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str] | SkippedSample:
        index, seed = key
        try:
            image = self.source.load_image(index)
        except ImageLoadError as error:
            return SkippedSample(self.source.describe(index), str(error))
        # fork_rng: the transform draws from torch's global RNG; seed it for this sample only and
        # give the caller (the training process when num_workers=0) its RNG state back untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        captions = self.source.captions(index)
        caption = captions[int(np.random.default_rng(seed).integers(len(captions)))]
        return pixels, caption


@dataclass
class Batch:
    """A collated batch: images (B, 3, H, W), input_ids and attention_mask (B, L)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    skipped: list[SkippedSample] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> Batch:
        return Batch(
            self.images.pin_memory(), self.input_ids.pin_memory(), self.attention_mask.pin_memory(), self.skipped
        )

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
            self.skipped,
        )


class Collator:
    """Stacks images and tokenizes captions in the loader worker, padding to the batch's longest."""

    def __init__(self, tokenizer: Tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, samples: Sequence[tuple[torch.Tensor, str] | SkippedSample]) -> Batch:
        skipped = [s for s in samples if isinstance(s, SkippedSample)]
        good = [s for s in samples if not isinstance(s, SkippedSample)]
        if not good:
            # a whole batch of unreadable images: an empty batch the trainer counts and moves past
            return Batch(
                torch.empty(0), torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long), skipped
            )
        images = torch.stack([pixels for pixels, _ in good])
        input_ids, attention_mask = self.tokenizer([caption for _, caption in good], self.context_length)
        return Batch(images, input_ids, attention_mask, skipped)


def build_train_loader(
    source: ImageTextSource,
    transform: Callable,
    tokenizer: Tokenizer,
    context_length: int,
    batch_size: int,
    seed: int,
    start_sample: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless loader of :class:`Batch` for training, resuming after ``start_sample`` samples.

    ``batch_size`` is this rank's batch. The loader draws nothing from torch's global RNG (it has a
    generator of its own), so creating it does not shift the training process's random stream.
    """
    sampler = ResumableSampler(len(source), seed, start=start_sample, rank=rank, world_size=world_size)
    if num_workers > 0:
        # tokenization runs in the forked workers; the tokenizers library's own thread pool would
        # otherwise warn on every fork and can deadlock after it
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        ImageTextDataset(source, transform),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=Collator(tokenizer, context_length),
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        drop_last=True,
    )
