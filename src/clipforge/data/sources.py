"""From a data config to a source: one builder per ``data.kind``.

What each kind needs (a path, whether it reads ``data.split``) is declared once, in
:data:`clipforge.config.DATA_KINDS`, which config validation and evaluation read; this table adds how each kind
is built, and the import-time check below keeps the two tables to the same kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from clipforge.config import DATA_KINDS, DataConfig
from clipforge.config.templates import validate_templates
from clipforge.data.base import DataError, ImageTextSource
from clipforge.data.captioned import read_coco, read_flickr
from clipforge.data.classification import ImageFolderSource, read_cifar, read_idx
from clipforge.data.corpus import CorpusSource
from clipforge.data.emoji import EmojiSource
from clipforge.data.files import require_dir
from clipforge.data.hf import HFSource
from clipforge.data.manifest import ManifestColumns, ManifestSource
from clipforge.data.mix import MixSource
from clipforge.data.shards import ShardSource
from clipforge.data.torchvision_datasets import TorchvisionSource


class TemplatedCaptions:
    """``source`` with each caption ``c`` also offered as ``t.format(c)`` for each of ``templates``
    (``data.caption_templates``): image ``i`` has the captions ``originals + [t.format(c) for t in templates
    for c in originals]``. Everything else (images, labels, a mix's sample weights) is the source's own."""

    def __init__(self, source: ImageTextSource, templates: Sequence[str]) -> None:
        self.source = source
        self.templates = validate_templates(templates)

    def __getattr__(self, name: str) -> Any:  # labels, classnames, sample_weights ...: the wrapped source's
        if name == "source":  # not set yet (unpickling): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)

    def load_image(self, index: int) -> Image.Image:
        return self.source.load_image(index)

    def captions(self, index: int) -> list[str]:
        originals = self.source.captions(index)
        return originals + [template.format(caption) for template in self.templates for caption in originals]

    def describe(self, index: int) -> str:
        return self.source.describe(index)


def _build_mix(config: DataConfig) -> ImageTextSource:
    if any(entry.kind == "webdataset" for entry in config.mix):
        raise DataError("data.kind='mix' draws from map-style sources; webdataset shards stream and cannot be mixed")
    sources = [build_source(entry) for entry in config.mix]
    return MixSource(sources, [entry.weight for entry in config.mix])


SOURCE_BUILDERS: dict[str, Callable[[DataConfig], ImageTextSource]] = {
    "emoji": lambda c: EmojiSource(c.split, captions=c.captions),
    "corpus": lambda c: CorpusSource(c.name, c.split),
    "manifest": lambda c: ManifestSource(c.path, ManifestColumns(c.image_column, c.caption_column, c.label_column)),
    "coco": lambda c: read_coco(c.path, c.image_root),
    "flickr": lambda c: read_flickr(c.path, c.image_root, c.split),
    "imagefolder": lambda c: ImageFolderSource(c.path, c.classnames),
    "idx": lambda c: read_idx(c.path, c.classnames),
    "cifar": lambda c: read_cifar(c.path, c.split, c.classnames),
    "hf": lambda c: HFSource(
        c.path, c.split, c.image_column, c.caption_column, c.label_column, c.image_root, c.classnames
    ),
    "torchvision": lambda c: TorchvisionSource(c.name, c.path, c.split, c.classnames),
    "mix": _build_mix,
    "webdataset": lambda c: ShardSource(c.path, c.shuffle_buffer, c.resample, c.epoch_size),
}
if SOURCE_BUILDERS.keys() != DATA_KINDS.keys():  # a kind added to one table and not the other
    raise RuntimeError(f"data kinds without a builder or a declaration: {SOURCE_BUILDERS.keys() ^ DATA_KINDS.keys()}")


def build_source(config: DataConfig) -> ImageTextSource:
    """The map-style source ``config.kind`` names, built from ``config.path`` and the kind's other fields.

    ``webdataset`` gives a :class:`~clipforge.data.shards.ShardSource` instead: tar shards have no index, so
    the loader streams them (``build_train_loader`` picks the path from the source's type).
    Fails at once (``FileNotFoundError`` / ``DataError``) when a path is missing or a file is not in the
    format the kind reads, before reading anything else: the message names the file, what was expected and,
    where it can tell, the kind that would read it.
    """
    builder = SOURCE_BUILDERS.get(config.kind)
    if builder is None:
        raise DataError(f"data.kind={config.kind!r} is unknown; choose one of {sorted(SOURCE_BUILDERS)}")
    if config.image_root:
        # each source reads its data.path first and would find a wrong image_root only after parsing it
        # (minutes for a large annotation file): a missing folder is named before anything is read
        require_dir(config.image_root, config.kind, "data.image_root: the folder holding the images")
    source = builder(config)
    if config.caption_templates and not isinstance(source, ShardSource):  # validation refuses shards
        return TemplatedCaptions(source, config.caption_templates)
    return source
