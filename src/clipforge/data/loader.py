"""From a source of (image, captions) to batches: resumable sampling, per-sample seeds, collation.

Exact resume rests on two rules:

* The sampler is a pure function of ``(seed, samples already consumed)``: epoch ``e`` visits a
  permutation seeded by ``(seed, e)`` (or, for a weighted source such as a mix, a weighted draw seeded
  the same way), and epochs follow each other without a break, so the sample at any position of the
  stream is known without replaying the ones before it.
* Every random choice made for a sample (its crop, its caption) is drawn from a generator seeded by
  ``(seed, epoch, index)``, never from a worker's global RNG, so it does not depend on which worker
  loads it or on how many workers there are. ``caption_sampling="cycle"`` instead takes caption
  ``visit mod n`` on the image's ``visit``-th visit, the visit number travelling in the sampler's key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from clipforge.data.sources import ImageLoadError, ImageTextSource
from clipforge.data.tokenize import Tokenizer

if TYPE_CHECKING:
    from clipforge.data.feature_cache import CachedFeatures

_MASK63 = (1 << 63) - 1


CAPTION_SAMPLING = ("random", "cycle")


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """A 63-bit seed for one visit of one sample, well mixed from its parts.

    ``repeat`` numbers the visits of one image within one epoch (a weighted sampler may draw an image
    twice); the first visit (0) has the seed of ``(seed, epoch, index)`` alone.
    """
    parts = [seed, epoch, index] + ([repeat] if repeat else [])
    return int(np.random.SeedSequence(parts).generate_state(2, dtype=np.uint64)[0]) & _MASK63


class SampleKey(NamedTuple):
    """What the sampler hands the dataset: the image, the seed of this visit, and the visit number
    (how many times the image was drawn before, over all ranks and all earlier epochs)."""

    index: int
    seed: int
    visit: int = 0


class ResumableSampler(Sampler):
    """An endless stream of :class:`SampleKey` for this rank, starting at ``start``.

    Epoch ``e`` is an order of ``num_samples`` indices drawn from ``(seed, e)``; rank ``r`` of
    ``world_size`` takes every ``world_size``-th element from offset ``r`` (ranks see disjoint parts of
    every epoch; the ``num_samples % world_size`` leftover samples of an epoch are skipped that epoch).
    ``start`` counts this rank's samples already consumed, across epochs.

    Without ``weights`` an epoch is a permutation of ``range(num_samples)``, and an image's visit number is
    the epoch. With ``weights`` (per image, any positive scale; e.g. a mix's ``sample_weights``) an epoch
    is ``num_samples`` draws in which image ``i`` appears ``floor`` or ``ceil`` of
    ``num_samples * w_i / sum(w)`` times (systematic sampling over a shuffled order, then shuffled), so
    shares match the weights closely within every epoch, not only on average; an image's visit number
    counts its draws in earlier epochs, which resuming at epoch ``E`` replays (``E`` cheap index draws,
    no image is read).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        weights: np.ndarray | None = None,
    ) -> None:
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (num_samples,) or not np.all(weights >= 0) or not weights.sum() > 0:
                raise ValueError(
                    f"sampling weights must be {num_samples} non-negative numbers with a positive sum, "
                    f"got shape {weights.shape}"
                )
            if not shuffle:
                raise ValueError("weighted sampling draws at random; it cannot be combined with shuffle=False")
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
        self.weights = weights
        self.per_rank = num_samples // world_size

    def full_epoch_order(self, epoch: int) -> np.ndarray:
        """All ranks' indices for ``epoch``: (num_samples,), before the split over ranks."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1 & _MASK63))
        order = torch.randperm(self.num_samples, generator=generator).numpy()
        if self.weights is None:
            return order
        # Systematic sampling: lay the images (in the shuffled order) end to end on [0, N) with lengths
        # N * w_i / sum(w), and take the image under each of the N points u, u + 1, ..., u + N - 1.
        ends = np.cumsum(self.weights[order])
        ends *= self.num_samples / ends[-1]
        offset = float(torch.rand((), generator=generator, dtype=torch.float64))
        picks = np.searchsorted(ends, offset + np.arange(self.num_samples), side="right")
        drawn = order[np.minimum(picks, self.num_samples - 1)]  # the minimum guards float rounding at the end
        return drawn[torch.randperm(self.num_samples, generator=generator).numpy()]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in visiting order."""
        return self.full_epoch_order(epoch)[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, position = divmod(self.start, self.per_rank)
        stride = slice(self.rank, self.per_rank * self.world_size, self.world_size)
        if self.weights is None:
            while True:
                for index in self.full_epoch_order(epoch)[stride][position:]:
                    yield SampleKey(int(index), sample_seed(self.seed, epoch, int(index)), epoch)
                epoch, position = epoch + 1, 0
        visits = np.zeros(self.num_samples, dtype=np.int64)  # draws of each image in earlier epochs
        for earlier in range(epoch):
            visits += np.bincount(self.full_epoch_order(earlier), minlength=self.num_samples)
        while True:
            order = self.full_epoch_order(epoch)
            repeat = _occurrence(order)
            for slot in range(self.rank, self.per_rank * self.world_size, self.world_size)[position:]:
                index, nth = int(order[slot]), int(repeat[slot])
                yield SampleKey(index, sample_seed(self.seed, epoch, index, nth), int(visits[index]) + nth)
            visits += np.bincount(order, minlength=self.num_samples)
            epoch, position = epoch + 1, 0


def _occurrence(order: np.ndarray) -> np.ndarray:
    """For each position, how many times its value appeared earlier: [5, 2, 5, 5] -> [0, 0, 1, 2]."""
    by_value = np.argsort(order, kind="stable")
    sorted_values = order[by_value]
    group_start = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    starts = np.repeat(group_start, np.diff(np.r_[group_start, len(order)]))
    occurrence = np.empty_like(order)
    occurrence[by_value] = np.arange(len(order)) - starts
    return occurrence


@dataclass
class SkippedSample:
    """A sample whose image could not be read: kept in the batch's bookkeeping, not in its tensors."""

    where: str
    reason: str


class ImageTextDataset(Dataset):
    """Map-style dataset over a source; ``dataset[(index, seed[, visit])]`` -> ``(image, caption)``.

    The image is transformed from a generator seeded by ``seed`` (the sampler's per-visit seed). One
    caption of the image is used per visit: ``caption_sampling="random"`` draws it from ``seed``;
    ``"cycle"`` takes caption ``visit mod n`` of the image's ``n`` (visit 0 = the first caption), so
    every caption is seen equally often. An image that fails to load gives a :class:`SkippedSample`
    instead of raising, so one bad file never stops a run.
    """

    def __init__(self, source: ImageTextSource, transform: Callable, caption_sampling: str = "random") -> None:
        if caption_sampling not in CAPTION_SAMPLING:
            raise ValueError(
                f"caption_sampling={caption_sampling!r} is unknown; choose one of {list(CAPTION_SAMPLING)}"
            )
        self.source = source
        self.transform = transform
        self.caption_sampling = caption_sampling

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[torch.Tensor, str] | SkippedSample:
        index, seed, *rest = key
        visit = rest[0] if rest else 0
        try:
            image = self.source.load_image(index)
        except ImageLoadError as error:
            return SkippedSample(self.source.describe(index), str(error))
        return prepare_sample(image, self.source.captions(index), seed, self.transform, self.caption_sampling, visit)


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
    caption_sampling: str = "random",
    streams: int | None = None,
    cached_features: CachedFeatures | None = None,
) -> DataLoader:
    """An endless loader of :class:`Batch` for training, resuming after ``start_sample`` samples.

    ``batch_size`` is this rank's batch. A source with ``sample_weights`` (a mix) is drawn by them, else
    every image once per epoch. ``caption_sampling``: ``random`` or ``cycle`` (see :class:`ImageTextDataset`).
    The loader draws nothing from torch's global RNG (it has a generator of its own), so creating it does
    not shift the training process's random stream.

    WebDataset shards (a :class:`~clipforge.data.shards.ShardSource`) are streamed instead, see
    :func:`clipforge.data.streaming.build_shard_loader`; ``streams`` is their slot layout (ignored otherwise).

    ``cached_features``: the feature cache of the run's locked towers (map-style sources only); the batches
    then carry those towers' features instead of their inputs (see :mod:`clipforge.data.feature_cache`), in
    the same sample order.
    """
    from clipforge.data.shards import ShardSource  # imported here: clipforge.data.streaming imports this module

    if isinstance(source, ShardSource) and cached_features is not None:
        raise ValueError("streamed shards have no random access for a feature cache; set data.cache_features=false")
    if isinstance(source, ShardSource):
        from clipforge.data.streaming import build_shard_loader

        return build_shard_loader(
            source,
            transform,
            tokenizer,
            context_length,
            batch_size,
            seed,
            start_sample,
            num_workers,
            rank,
            world_size,
            pin_memory,
            caption_sampling,
            streams,
        )
    weights = getattr(source, "sample_weights", None)
    sampler = ResumableSampler(len(source), seed, start=start_sample, rank=rank, world_size=world_size, weights=weights)
    if num_workers > 0:
        # tokenization runs in the forked workers; the tokenizers library's own thread pool would
        # otherwise warn on every fork and can deadlock after it
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset: Dataset = ImageTextDataset(source, transform, caption_sampling)
    collate: Callable = Collator(tokenizer, context_length)
    if cached_features is not None:
        from clipforge.data.feature_cache import CachedCollator, CachedFeatureDataset  # it imports this module

        dataset = CachedFeatureDataset(source, transform, cached_features, caption_sampling)
        image_cached, text_cached = cached_features.image_views is not None, cached_features.text is not None
        collate = CachedCollator(tokenizer, context_length, image_cached, text_cached)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        drop_last=True,
    )
