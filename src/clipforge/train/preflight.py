"""Checks of the training data made at the run's start, before a tokenizer or model is built.

Each catches a run that would otherwise start and then go nowhere: a batch larger than the data (every batch
would hold the same image twice), or data of which no image can be read (the loop would skip batch after
batch forever). A streamed source (shards) has no length and no random access (its ``capabilities`` say so); it is
checked in the loop instead (:data:`MAX_EMPTY_BATCHES`).
"""

from __future__ import annotations

from clipforge.config import ConfigError, DataConfig
from clipforge.data.base import DataError, ImageLoadError, Source, capabilities_of

# how many images, in index order, the start-up check tries before it calls the data unreadable
PROBED_IMAGES = 64
# batches in a row with nothing to contrast after which the loop gives up on the data
MAX_EMPTY_BATCHES = 50


def describe_data(data: DataConfig) -> str:
    """``data.kind='manifest', data.path='train.csv'``: the data as the config names it, for messages."""
    return data.describe("data")


def check_batch_fits(source: Source, data: DataConfig, batch_size: int, world_size: int) -> None:
    """Refuse a batch larger than one epoch's share of the data: each of ``world_size`` processes takes
    ``batch_size / world_size`` pairs a step from its ``len(source) // world_size`` images an epoch."""
    if not capabilities_of(source).random_access:
        return
    per_process, share = batch_size // world_size, len(source) // world_size
    if per_process <= share:
        return
    if world_size == 1:
        raise ConfigError(
            f"train.batch_size={batch_size} is larger than the {len(source)} images of {describe_data(data)}: "
            f"every batch would hold an image twice; use train.batch_size <= {len(source)}"
        )
    raise ConfigError(
        f"train.batch_size={batch_size} over {world_size} processes is {per_process} pairs each, more than the "
        f"{share} images each process takes an epoch from the {len(source)} of {describe_data(data)}: every batch "
        f"would hold an image twice; use train.batch_size <= {share * world_size}"
    )


def check_images_decode(source: Source, data: DataConfig) -> None:
    """Raise ``DataError`` unless one of the first :data:`PROBED_IMAGES` images (in index order) decodes.

    Stops at the first readable one, so healthy data costs one image read.
    """
    if not capabilities_of(source).random_access:
        return
    tried = min(PROBED_IMAGES, len(source))
    first_reason = None
    for index in range(tried):
        try:
            source.load_image(index)
            return
        except ImageLoadError as error:
            first_reason = first_reason or str(error)
    raise DataError(
        f"{describe_data(data)}: none of the first {tried} images could be read (the first: {first_reason}); "
        "check that the image files exist where the data says and are images"
    )


def empty_batches_error(data: DataConfig, batches: int, batch_size: int, skipped_images: int) -> DataError:
    """The error of a loop that met ``batches`` batches in a row with fewer than 2 readable pairs."""
    return DataError(
        f"{describe_data(data)}: {batches} batches in a row ({batches * batch_size} samples) held fewer than 2 "
        f"readable image-caption pairs, so no step could be taken ({skipped_images} unreadable images so far, "
        "the first ones in the warnings above); fix or remove the unreadable images"
    )
