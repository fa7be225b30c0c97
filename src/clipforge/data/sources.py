"""From a data config to a source: one builder per ``data.kind``.

What each kind needs (a path, whether it reads ``data.split``) is declared once, in
:data:`clipforge.config.DATA_KINDS`, which config validation and evaluation read; this table adds how each kind
is built, and the import-time check below keeps the two tables to the same kinds.
"""

from __future__ import annotations

from collections.abc import Callable

from clipforge.config import DATA_KINDS, DataConfig
from clipforge.data.base import ImageTextSource
from clipforge.data.captioned import read_coco, read_flickr
from clipforge.data.classification import ImageFolderSource, read_cifar, read_idx
from clipforge.data.emoji import EmojiSource
from clipforge.data.hf import HFSource
from clipforge.data.manifest import ManifestSource
from clipforge.data.mix import MixSource
from clipforge.data.shards import ShardSource


def _build_mix(config: DataConfig) -> ImageTextSource:
    if any(entry.kind == "webdataset" for entry in config.mix):
        raise ValueError("data.kind='mix' draws from map-style sources; webdataset shards stream and cannot be mixed")
    sources = [build_source(entry) for entry in config.mix]
    return MixSource(sources, [entry.weight for entry in config.mix])


SOURCE_BUILDERS: dict[str, Callable[[DataConfig], ImageTextSource]] = {
    "emoji": lambda c: EmojiSource(c.split),
    "manifest": lambda c: ManifestSource(c.path),
    "coco": lambda c: read_coco(c.path, c.image_root),
    "flickr": lambda c: read_flickr(c.path, c.image_root, c.split),
    "imagefolder": lambda c: ImageFolderSource(c.path, c.classnames),
    "idx": lambda c: read_idx(c.path, c.classnames),
    "cifar": lambda c: read_cifar(c.path, c.split, c.classnames),
    "hf": lambda c: HFSource(
        c.path, c.split, c.image_column, c.caption_column, c.label_column, c.image_root, c.classnames
    ),
    "mix": _build_mix,
    "webdataset": lambda c: ShardSource(c.path, c.shuffle_buffer, c.resample, c.epoch_size),
}
if SOURCE_BUILDERS.keys() != DATA_KINDS.keys():  # a kind added to one table and not the other
    raise RuntimeError(f"data kinds without a builder or a declaration: {SOURCE_BUILDERS.keys() ^ DATA_KINDS.keys()}")


def build_source(config: DataConfig) -> ImageTextSource:
    """The map-style source ``config.kind`` names, built from ``config.path`` and the kind's other fields.

    ``webdataset`` gives a :class:`~clipforge.data.shards.ShardSource` instead: tar shards have no index, so
    the loader streams them (``build_train_loader`` picks the path from the source's type).
    Fails at once (``FileNotFoundError`` / ``ValueError``) when a path is missing or a file is not in the
    format the kind reads; the message names the file, what was expected and, where it can tell, the kind
    that would read it.
    """
    builder = SOURCE_BUILDERS.get(config.kind)
    if builder is None:
        raise ValueError(f"data.kind={config.kind!r} is unknown; choose one of {sorted(SOURCE_BUILDERS)}")
    return builder(config)
