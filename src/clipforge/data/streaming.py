"""Endless, exactly resumable training batches from WebDataset shards.

The stream is a pure function of ``(seed, batches consumed)``, so a resumed run reads on from the same sample:

* A rank's data is split into ``streams`` independent *slots* (global slot ``rank * streams + s``), and batch
  ``b`` of the rank is the next ``batch_size`` samples of its slot ``b % streams``. A slot's position after
  ``b`` batches is therefore ``(b // streams) * batch_size`` plus one batch for the slots before ``b % streams``,
  known without reading anything.
* Epoch ``e`` of slot ``k``: without resampling, the shards of a permutation seeded by ``(seed, e)``, every
  ``world_size * streams``-th from offset ``k`` (so ranks and slots see disjoint shards of every epoch and
  together all of them); with resampling, shards drawn with replacement from a generator seeded by
  ``(seed, e, k)`` until the slot has given ``epoch_size // (world_size * streams)`` samples.
* The slot's samples pass a shuffle buffer seeded by ``(seed, e, k)``, which is emptied at the end of each
  epoch; every random choice for a sample (crop, caption) comes from ``sample_seed(seed, e, k * 2**40 + i)``
  for its position ``i`` in the slot's epoch.

Loader workers own slots: with ``W`` workers the DataLoader takes batch ``b`` from worker ``b % W`` (strict
round robin, as no worker's stream ends), and ``W`` divides ``streams``, so each slot is read by one worker
only. ``streams`` defaults to the number of workers and is kept in the checkpoint: a run resumed with another
worker count keeps the old slot layout, so it stays exact (the worker count is lowered to a divisor if needed).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.base import DataError, ImageLoadError, decode_image
from clipforge.data.loader_spec import LoaderSpec
from clipforge.data.samples import Collator, SkippedSample, prepare_sample, sample_seed
from clipforge.data.shards import SampleRef, ShardSource
from clipforge.runtime import ignore_interrupt_signals, usable_workers

logger = logging.getLogger("clipforge")

_SHARD_ORDER, _RESAMPLE, _SHUFFLE = 1, 2, 3  # what a generator is for: part of its seed
_SLOT_STRIDE = 2**40  # sample seeds: slot * stride + position in the slot's epoch


def _generator(seed: int, epoch: int, purpose: int, slot: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, purpose, slot]))


def shuffle_buffer(items: Iterable, size: int, generator: np.random.Generator) -> Iterator:
    """Items in a shuffled order using a buffer of ``size``: fill it, then emit a random slot and refill it.

    The draws depend only on how many items came in, never on what they are; at the end the buffer is
    emptied in a random order. ``size <= 1`` keeps the order.
    """
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(generator.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in generator.permutation(len(buffer)):
        yield buffer[slot]


class ShardStream(IterableDataset):
    """Endless lists of ``batch_size`` samples (``(pixels, caption)`` or :class:`SkippedSample`) for one rank.

    ``start_batch``: batches this rank has already consumed. See the module docstring for the stream itself.
    """

    def __init__(
        self,
        source: ShardSource,
        transform: Callable,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        streams: int = 1,
        caption_sampling: str = "random",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        slots = world_size * streams
        if source.resample:
            self.per_slot_epoch = source.epoch_size // slots
            if self.per_slot_epoch < 1:
                raise DataError(
                    f"data.epoch_size={source.epoch_size} is less than one sample for each of the "
                    f"{slots} streams (world_size={world_size} x {streams} loader streams)"
                )
        elif len(source.shards) < slots:
            raise DataError(
                f"{len(source.shards)} shards cannot be split over world_size={world_size} x {streams} loader "
                "streams (each reads whole shards): write smaller shards (clipforge data pack --shard-size), "
                "use fewer data.num_workers, or set data.resample=true with a data.epoch_size"
            )
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self.streams = streams
        self.caption_sampling = caption_sampling

    # -- which samples, in which order -------------------------------------------------------------
    def epoch_shards(self, epoch: int, slot: int) -> np.ndarray:
        """The shards global slot ``slot`` reads in ``epoch`` without resampling, in reading order."""
        order = _generator(self.seed, epoch, _SHARD_ORDER).permutation(len(self.source.shards))
        return order[slot :: self.world_size * self.streams]

    def _epoch_refs(self, epoch: int, slot: int) -> Iterator[SampleRef]:
        if not self.source.resample:
            for shard in self.epoch_shards(epoch, slot):
                yield from self.source.scan(int(shard))
            return
        draws = _generator(self.seed, epoch, _RESAMPLE, slot)
        while True:
            refs = self.source.scan(int(draws.integers(len(self.source.shards))))
            self._check_not_empty()
            yield from refs

    def _check_not_empty(self) -> None:
        if self.source.all_empty():
            raise self.source.no_sample_error()

    def slot_stream(self, slot: int, skip: int = 0) -> Iterator[tuple[int, int, SampleRef]]:
        """``(epoch, position in the epoch, sample)`` of global slot ``slot``, endless, after ``skip`` samples.

        Skipped samples cost a header scan at most; whole epochs skipped without resampling only sum the
        shards' sample counts (cached per process).
        """
        epoch, buffer = 0, self.source.shuffle_buffer
        if self.source.resample:
            epoch, skip = divmod(skip, self.per_slot_epoch)
            # the buffer is filled afresh every epoch: scanning more than an epoch's samples would be wasted
            buffer = min(buffer, self.per_slot_epoch)
        while True:
            if skip and not self.source.resample:
                length = sum(self.source.count(int(shard)) for shard in self.epoch_shards(epoch, slot))
                if skip >= length:
                    self._check_not_empty()
                    skip, epoch = skip - length, epoch + 1
                    continue
            samples = shuffle_buffer(
                self._epoch_refs(epoch, slot), buffer, _generator(self.seed, epoch, _SHUFFLE, slot)
            )
            if self.source.resample:
                samples = itertools.islice(samples, self.per_slot_epoch)
            position = -1
            for position, ref in enumerate(samples):
                if position >= skip:
                    yield epoch, position, ref
            if position < 0:  # an epoch of empty or unreadable shards for this slot: fine unless all are
                self._check_not_empty()
            skip, epoch = 0, epoch + 1

    # -- loading -----------------------------------------------------------------------------------
    def load(self, epoch: int, position: int, ref: SampleRef, slot: int) -> tuple[torch.Tensor, str] | SkippedSample:
        """One sample's training view, or a :class:`SkippedSample` saying why it has none."""
        sample = self.source.read(ref)
        if sample.problem:
            return SkippedSample(sample.where, sample.problem)
        try:
            image = decode_image(sample.image)
        except ImageLoadError as error:
            return SkippedSample(sample.where, str(error))
        seed = sample_seed(self.seed, epoch, slot * _SLOT_STRIDE + position)
        # an image's visit number is its epoch (with resampling, approximately: a shard may be drawn twice)
        return prepare_sample(image, sample.captions, seed, self.transform, self.caption_sampling, epoch)

    def __iter__(self) -> Iterator[list]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.streams % workers:
            raise ValueError(f"{workers} loader workers cannot share {self.streams} streams evenly")
        slots: dict[int, Iterator[tuple[int, int, SampleRef]]] = {}
        batch = self.start_batch + worker  # round robin: this worker's batches are worker, worker + W, ...
        while True:
            stream = batch % self.streams
            if stream not in slots:
                # W divides streams, so every earlier batch of this slot came before start_batch
                skip = (batch // self.streams) * self.batch_size
                slots[stream] = self.slot_stream(self.rank * self.streams + stream, skip)
            slot = self.rank * self.streams + stream
            yield [self.load(*item, slot) for item in itertools.islice(slots[stream], self.batch_size)]
            batch += workers


def build_shard_loader(source: ShardSource, spec: LoaderSpec) -> DataLoader:
    """An endless loader of :class:`~clipforge.data.samples.Batch` over shards, after ``spec.start_sample`` samples.

    ``spec.streams`` (default: ``max(1, spec.num_workers)``) fixes the slot layout; pass the value the run
    started with when resuming. The worker count is lowered to the largest divisor of ``streams`` (with a
    warning) if needed.
    """
    streams = spec.streams or max(1, spec.num_workers)
    if spec.start_sample % spec.batch_size:
        raise ValueError(f"start_sample={spec.start_sample} is not a whole number of batches of {spec.batch_size}")
    workers = usable_workers(spec.num_workers)
    while workers > 0 and streams % workers:
        workers -= 1
    if workers != usable_workers(spec.num_workers):
        logger.warning(
            "data.num_workers=%d does not divide the %d shard streams this run started with; using %d workers "
            "so that the data order stays exactly that of the first run",
            spec.num_workers,
            streams,
            workers,
        )
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # see build_train_loader
    stream = ShardStream(
        source,
        spec.transform,
        spec.batch_size,
        spec.seed,
        spec.start_sample // spec.batch_size,
        spec.rank,
        spec.world_size,
        streams,
        spec.caption_sampling,
    )
    return DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches: it must choose which slot each one comes from
        num_workers=workers,
        collate_fn=Collator(spec.processor),
        pin_memory=spec.pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(spec.seed),  # the workers' base seed must not draw on the global RNG
        worker_init_fn=ignore_interrupt_signals,
    )
