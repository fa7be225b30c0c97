"""From a data config to a source: the kind's reader, called with the kind's arguments.

Each data kind (``clipforge.config.data_kinds``) names its reader - a class or function in ``clipforge.data``
that builds the source - and says how its fields become that reader's arguments; this module resolves the name
(the config layer never imports the data layer) and adds what every kind shares: the ``image_root`` check and
``caption_templates``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from clipforge.config import DataConfig
from clipforge.config.templates import validate_templates
from clipforge.data.base import ImageTextSource, Source, capabilities_of
from clipforge.data.files import require_dir


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


def reader_of(config: DataConfig | type[DataConfig]) -> Callable[..., Source]:
    """The callable ``config``'s kind names as its reader (``"clipforge.data.<module>:<name>"``), imported."""
    module, _, name = config.reader.partition(":")
    if not module.startswith("clipforge.data.") or not name:
        raise ValueError(f"data.kind={config.kind_name()!r}: its reader {config.reader!r} is not in clipforge.data")
    return getattr(importlib.import_module(module), name)


def build_source(config: DataConfig) -> Source:
    """The source ``config`` describes: its kind's reader called with ``config.reader_arguments()``, its captions
    offered with ``config.caption_templates`` (a map-style source; validation refuses templates on a streamed one).

    ``webdataset`` gives a streamed :class:`~clipforge.data.shards.ShardSource` (its ``capabilities`` say so; the
    loader streams it). Fails at once (``FileNotFoundError`` / ``DataError``) when a path is missing or a file is
    not in the format the kind reads, before reading anything else: the message names the file, what was expected
    and, where it can tell, the kind that would read it.
    """
    image_root = config.get("image_root", "")
    if image_root:
        # each source reads its data.path first and would find a wrong image_root only after parsing it
        # (minutes for a large annotation file): a missing folder is named before anything is read
        require_dir(image_root, config.kind, "data.image_root: the folder holding the images")
    source = reader_of(config)(**config.reader_arguments())
    if config.caption_templates and capabilities_of(source).random_access:
        return TemplatedCaptions(source, config.caption_templates)
    return source


def training_captions(source: Source) -> list[str]:
    """Every caption of ``source`` (what a BPE tokenizer trains on): by index, or in one pass over a streamed
    source's caption members, reading no image."""
    if capabilities_of(source).random_access:
        return [caption for index in range(len(source)) for caption in source.captions(index)]
    return list(source.iter_captions())
