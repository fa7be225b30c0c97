"""The training sampler: an endless, resumable stream of sample keys, split over ranks.

The sampler is a pure function of ``(seed, samples already consumed)``: epoch ``e`` visits a permutation
seeded by ``(seed, e)`` (or, for a weighted source such as a mix, a weighted draw seeded the same way), and
epochs follow each other without a break, so the sample at any position of the stream is known without
replaying the ones before it. That, with per-sample seeds (``clipforge.data.samples``), is what makes resume
exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from clipforge.data.base import DataError
from clipforge.data.samples import MASK63, SampleKey, sample_seed


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
            raise DataError(
                f"cannot split {num_samples} samples over {world_size} ranks: the data has fewer images than processes"
            )
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
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1 & MASK63))
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
