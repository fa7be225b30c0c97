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
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from clipforge.data.base import DataError, ImageLoadError, ImageTextSource, Source, capabilities_of
from clipforge.data.feature_cache import CachedCollator, CachedFeatureDataset, CachedFeatures
from clipforge.data.loader_spec import LoaderSpec
from clipforge.data.sampler import ResumableSampler
from clipforge.data.samples import CAPTION_SAMPLING, Collator, SkippedSample, prepare_sample
from clipforge.data.streaming import build_shard_loader
from clipforge.runtime import ignore_interrupt_signals, usable_workers

__all__ = ["ImageTextDataset", "LoaderSpec", "build_train_loader"]


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


def build_train_loader(source: Source, spec: LoaderSpec, cached_features: CachedFeatures | None = None) -> DataLoader:
    """An endless loader of :class:`Batch` for training, resuming after ``spec.start_sample`` samples.

    ``spec.batch_size`` is this rank's batch. A source with ``sample_weights`` (a mix) is drawn by them, else
    every image once per epoch. ``spec.caption_sampling``: ``random`` or ``cycle`` (see
    :class:`ImageTextDataset`). The loader draws nothing from torch's global RNG (it has a generator of its
    own), so creating it does not shift the training process's random stream.

    A source without random access that streams (``capabilities``: WebDataset shards) is streamed instead, see
    :func:`clipforge.data.streaming.build_shard_loader`; ``spec.streams`` is their slot layout.

    ``cached_features``: the feature cache of the run's locked towers (map-style sources only); the batches
    then carry those towers' features instead of their inputs (see :mod:`clipforge.data.feature_cache`), in
    the same sample order.
    """
    capabilities = capabilities_of(source)
    if cached_features is not None and not capabilities.cacheable:
        raise DataError("streamed shards have no random access for a feature cache; set data.cache_features=false")
    if not capabilities.random_access:
        if not capabilities.streaming:
            raise DataError(f"{source!r} has neither random access nor a stream of samples: nothing to load")
        return build_shard_loader(source, spec)
    weights = getattr(source, "sample_weights", None)
    sampler = ResumableSampler(
        len(source), spec.seed, start=spec.start_sample, rank=spec.rank, world_size=spec.world_size, weights=weights
    )
    if spec.num_workers > 0:
        # tokenization runs in the forked workers; the tokenizers library's own thread pool would
        # otherwise warn on every fork and can deadlock after it
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transform = spec.transform
    dataset: Dataset = ImageTextDataset(source, transform, spec.caption_sampling)
    collate: Callable = Collator(spec.processor)
    if cached_features is not None:
        dataset = CachedFeatureDataset(source, transform, cached_features, spec.caption_sampling)
        image_cached, text_cached = cached_features.image_views is not None, cached_features.text is not None
        collate = CachedCollator(spec.processor, image_cached, text_cached)
    return DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        num_workers=usable_workers(spec.num_workers),
        collate_fn=collate,
        pin_memory=spec.pin_memory,
        persistent_workers=spec.num_workers > 0,
        prefetch_factor=4 if spec.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(spec.seed),
        drop_last=True,
        worker_init_fn=ignore_interrupt_signals,
    )
