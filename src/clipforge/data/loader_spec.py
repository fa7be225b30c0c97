"""What a training loader is asked for: one frozen value that both loader paths (map-style and shards) read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clipforge.config import AugmentConfig
from clipforge.data.processor import Processor
from clipforge.data.samples import CAPTION_SAMPLING


@dataclass(frozen=True)
class LoaderSpec:
    """How to turn a source into training batches (see :func:`clipforge.data.loader.build_train_loader`)."""

    processor: Processor
    """The model's processor: the training image transform (its preprocessing with ``augment``; the transform draws
    its randomness from torch's global RNG, and each sample runs it under its own seed) and the tokenizer with its
    context length, run in the loader workers."""

    augment: AugmentConfig | None
    """The training augmentation (``data.augment``); None: the evaluation transform."""

    batch_size: int
    """Pairs per batch on this rank (the run's batch divided by the world size)."""

    seed: int
    """The run's seed: the sample order, every crop and every caption choice derive from it."""

    start_sample: int = 0
    """Samples this rank has already consumed: the loader resumes right after them (exact resume)."""

    num_workers: int = 0
    """Loader worker processes (0: load in the training process)."""

    rank: int = 0
    """This process's rank in ``[0, world_size)``: it loads its own share of every epoch."""

    world_size: int = 1
    """The number of training processes sharing each epoch."""

    pin_memory: bool = False
    """Pin batches in page-locked memory (for a CUDA device: faster, asynchronous copies)."""

    caption_sampling: str = "random"
    """Which caption of an image a visit uses: ``random`` (drawn from the sample's seed) or ``cycle``
    (caption ``visit mod n``)."""

    streams: int | None = None
    """WebDataset shards only: the slot layout of the stream (default ``max(1, num_workers)``), kept in the
    checkpoint so a resumed run reads on in the same order; ignored for map-style sources."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 (0 = load in this process)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must lie in [0, world_size={self.world_size})")
        if self.caption_sampling not in CAPTION_SAMPLING:
            raise ValueError(
                f"caption_sampling={self.caption_sampling!r} is unknown; choose one of {list(CAPTION_SAMPLING)}"
            )
        if self.streams is not None and self.streams < 1:
            raise ValueError(f"streams={self.streams} must be positive (or None: one per loader worker)")

    @property
    def transform(self) -> Callable:
        """The image transform of this loader (:attr:`processor`'s, with :attr:`augment`)."""
        return self.processor.image_transform(self.augment)
