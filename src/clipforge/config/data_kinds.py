"""The data kinds: one small dataclass per ``data.kind``, with only its own fields, rules, reader and capabilities.

Each class adds its kind's fields to :class:`~clipforge.config.data_section.DataConfig` (the fields every kind
shares) and declares the rest of what the kind is: ``required`` (fields that may not stay empty, and what they
must name), ``input_fields`` (the files it reads), ``check`` (its own rules), ``reader`` and ``reader_arguments``
(the callable in ``clipforge.data`` that builds its source, and how the fields become that callable's arguments:
the config layer names the reader and never imports it) and ``capabilities``. ``@register_data_kind`` is the
registration. Adding a kind is one class here plus its reader in ``clipforge.data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from clipforge.config.data_section import DATA_KINDS as DATA_KINDS  # complete once this module is imported
from clipforge.config.data_section import (
    STREAMED,
    UNLABELLED,
    DataConfig,
    SourceCapabilities,
    register_data_kind,
)
from clipforge.config.errors import ConfigError

DEFAULT_SPLIT = "train"  # the split a kind with splits reads when none is set


@register_data_kind
@dataclass
class EmojiData(DataConfig):
    """``emoji``: the built-in Noto emoji set (``split``: train | val | test | all, concept-disjoint).
    ``captions``: ``name`` (the Unicode name only) or ``all`` (also its CLDR keywords, a second caption)."""

    kind: Literal["emoji"] = "emoji"
    split: str = DEFAULT_SPLIT
    captions: Literal["name", "all"] = "name"

    reader: ClassVar[str] = "clipforge.data.emoji:EmojiSource"

    def reader_arguments(self) -> dict[str, Any]:
        return {"split": self.split, "captions": self.captions}


@register_data_kind
@dataclass
class CorpusData(DataConfig):
    """``corpus``: a built-in source named by ``name``: ``clipart`` (public-domain Openclipart drawings, titles and
    keywords), ``flags`` (country and region flags with their names), ``icons`` (freedesktop icon themes, names as
    phrases), ``twemoji`` (the emoji set's emoji in Twitter's art, with its captions and splits); ``split``:
    train | val | test | all, concept-disjoint."""

    kind: Literal["corpus"] = "corpus"
    name: str = ""
    split: str = DEFAULT_SPLIT

    reader: ClassVar[str] = "clipforge.data.corpus:CorpusSource"
    required: ClassVar[dict[str, str]] = {"name": "a built-in corpus source: clipart, flags, icons or twemoji"}

    def reader_arguments(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split}


@register_data_kind
@dataclass
class ManifestData(DataConfig):
    """``manifest``: a CSV/TSV/JSONL file with an image column (a path relative to the manifest) and a caption
    column (several rows per image, or a JSONL list under the caption key's plural, e.g. ``captions``); an optional
    label column. ``image_column``, ``caption_column``, ``label_column``: their names (CSV/TSV header names, JSONL
    keys)."""

    kind: Literal["manifest"] = "manifest"
    path: str = ""
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"

    reader: ClassVar[str] = "clipforge.data.manifest:open_manifest"
    required: ClassVar[dict[str, str]] = {"path": "the CSV/TSV/JSONL file of image,caption rows"}
    input_fields: ClassVar[tuple[str, ...]] = ("path",)

    def reader_arguments(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "image_column": self.image_column,
            "caption_column": self.caption_column,
            "label_column": self.label_column,
        }


@register_data_kind
@dataclass
class CocoData(DataConfig):
    """``coco``: an MS-COCO ``captions_*.json`` (``images`` + ``annotations``); images in ``image_root`` (empty:
    the ``train2017/`` beside ``annotations/``, else the file's own folder)."""

    kind: Literal["coco"] = "coco"
    path: str = ""
    image_root: str = ""

    capabilities: ClassVar[SourceCapabilities] = UNLABELLED
    reader: ClassVar[str] = "clipforge.data.captioned:read_coco"
    required: ClassVar[dict[str, str]] = {"path": "the path to captions_*.json"}
    input_fields: ClassVar[tuple[str, ...]] = ("path", "image_root")

    def reader_arguments(self) -> dict[str, Any]:
        return {"path": self.path, "image_root": self.image_root}


@register_data_kind
@dataclass
class FlickrData(DataConfig):
    """``flickr``: a Karpathy split JSON (``dataset_flickr8k.json`` ..., read by ``split``), a ``Flickr8k.token.txt``
    file or a ``captions.txt`` CSV; images in ``image_root``."""

    kind: Literal["flickr"] = "flickr"
    path: str = ""
    image_root: str = ""
    split: str = DEFAULT_SPLIT

    capabilities: ClassVar[SourceCapabilities] = UNLABELLED
    reader: ClassVar[str] = "clipforge.data.captioned:read_flickr"
    required: ClassVar[dict[str, str]] = {
        "path": "the Karpathy dataset_*.json, Flickr8k.token.txt or captions.txt file"
    }
    input_fields: ClassVar[tuple[str, ...]] = ("path", "image_root")

    def reader_arguments(self) -> dict[str, Any]:
        return {"path": self.path, "image_root": self.image_root, "split": self.split}


@register_data_kind
@dataclass
class ImageFolderData(DataConfig):
    """``imagefolder``: ``path/<class>/<image>``; readable names from ``classnames`` (JSON/TXT) if given."""

    kind: Literal["imagefolder"] = "imagefolder"
    path: str = ""
    classnames: str = ""

    reader: ClassVar[str] = "clipforge.data.classification:ImageFolderSource"
    required: ClassVar[dict[str, str]] = {"path": "the root folder holding one sub-folder per class"}
    input_fields: ClassVar[tuple[str, ...]] = ("path", "classnames")

    def reader_arguments(self) -> dict[str, Any]:
        return {"root": self.path, "classnames": self.classnames}


@register_data_kind
@dataclass
class IdxData(DataConfig):
    """``idx``: MNIST-family ``*-images-idx3-ubyte[.gz]`` (the labels file found beside it); ``classnames``: a
    shipped list (``fashion-mnist``) or a file, else "0".."9"."""

    kind: Literal["idx"] = "idx"
    path: str = ""
    classnames: str = ""

    reader: ClassVar[str] = "clipforge.data.classification:read_idx"
    required: ClassVar[dict[str, str]] = {"path": "the *-images-idx3-ubyte[.gz] file"}
    input_fields: ClassVar[tuple[str, ...]] = ("path", "classnames")

    def reader_arguments(self) -> dict[str, Any]:
        return {"path": self.path, "classnames": self.classnames}


@register_data_kind
@dataclass
class CifarData(DataConfig):
    """``cifar``: the CIFAR-10/100 python pickle folder; ``split``: train | test."""

    kind: Literal["cifar"] = "cifar"
    path: str = ""
    split: str = DEFAULT_SPLIT
    classnames: str = ""

    reader: ClassVar[str] = "clipforge.data.classification:read_cifar"
    required: ClassVar[dict[str, str]] = {"path": "the cifar-10-batches-py or cifar-100-python folder"}
    input_fields: ClassVar[tuple[str, ...]] = ("path", "classnames")

    def reader_arguments(self) -> dict[str, Any]:
        return {"path": self.path, "split": self.split, "classnames": self.classnames}


@register_data_kind
@dataclass
class HFData(DataConfig):
    """``hf``: a ``datasets`` folder saved with ``save_to_disk``, or Parquet/Arrow files (a glob works), read by
    ``split``; ``image_column``, ``caption_column`` and/or ``label_column`` name its Arrow columns, relative image
    paths are read under ``image_root``."""

    kind: Literal["hf"] = "hf"
    path: str = ""
    split: str = DEFAULT_SPLIT
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"
    image_root: str = ""
    classnames: str = ""

    reader: ClassVar[str] = "clipforge.data.hf:HFSource"
    required: ClassVar[dict[str, str]] = {"path": "a datasets folder (save_to_disk) or Parquet/Arrow files"}
    input_fields: ClassVar[tuple[str, ...]] = ("path", "image_root", "classnames")

    def reader_arguments(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "split": self.split,
            "image_column": self.image_column,
            "caption_column": self.caption_column,
            "label_column": self.label_column,
            "image_root": self.image_root,
            "classnames": self.classnames,
        }


@register_data_kind
@dataclass
class TorchvisionData(DataConfig):
    """``torchvision``: a ``torchvision.datasets`` class named by ``name`` (``STL10``, ``Food101``, ``Flowers102``,
    ``OxfordIIITPet``, ``ImageNet`` ...) read from its local root ``path`` with ``download=False``; ``split`` as the
    class takes it; captions are the dataset's class names."""

    kind: Literal["torchvision"] = "torchvision"
    name: str = ""
    path: str = ""
    split: str = DEFAULT_SPLIT
    classnames: str = ""

    reader: ClassVar[str] = "clipforge.data.torchvision_datasets:TorchvisionSource"
    required: ClassVar[dict[str, str]] = {
        "path": "the dataset's root folder, laid out as torchvision expects",
        "name": "the torchvision.datasets class, e.g. STL10 or Food101",
    }
    input_fields: ClassVar[tuple[str, ...]] = ("path", "classnames")

    def reader_arguments(self) -> dict[str, Any]:
        return {"name": self.name, "root": self.path, "split": self.split, "classnames": self.classnames}


@register_data_kind
@dataclass
class WebDatasetData(DataConfig):
    """``webdataset``: tar shards, brace notation allowed (``data/{00000..00123}.tar``), as img2dataset or
    ``clipforge data pack`` writes them, a folder of ``.tar`` shards, or CLIP_benchmark's ``wds_<name>/`` folder (its
    ``test/`` shards; ``wds_<name>/train`` for another split; ``classnames.txt`` and the templates file beside).
    Streamed: shards are shuffled per epoch and split over ranks and loader workers, samples pass a
    ``shuffle_buffer``; ``resample: true`` draws shards with replacement and then needs ``epoch_size`` (samples per
    epoch over all ranks; without resampling an epoch is one pass over the shards and ``epoch_size`` is not used).
    Evaluation indexes the shards with one scan of their headers."""

    kind: Literal["webdataset"] = "webdataset"
    path: str = ""
    shuffle_buffer: int = 1000
    resample: bool = False
    epoch_size: int | None = None

    capabilities: ClassVar[SourceCapabilities] = STREAMED
    reader: ClassVar[str] = "clipforge.data.shards:ShardSource"
    required: ClassVar[dict[str, str]] = {"path": "the shard list, e.g. data/{00000..00123}.tar"}
    input_fields: ClassVar[tuple[str, ...]] = ("path",)

    def reader_arguments(self) -> dict[str, Any]:
        return {
            "spec": self.path,
            "shuffle_buffer": self.shuffle_buffer,
            "resample": self.resample,
            "epoch_size": self.epoch_size,
        }

    def check(self, prefix: str) -> None:
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ConfigError(f"{prefix}.epoch_size={self.epoch_size} must be positive (or null)")
        if self.resample and self.epoch_size is None:
            raise ConfigError(
                f"{prefix}.resample=true needs {prefix}.epoch_size: the samples in one epoch over all ranks "
                "(resampled shards have no natural end)"
            )
        if self.shuffle_buffer < 0:
            raise ConfigError(f"{prefix}.shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 or 1: no shuffling)")


@register_data_kind
@dataclass
class MixData(DataConfig):
    """``mix``: the sources listed in ``mix``, sampled in proportion to their ``weight`` (each entry is any
    map-style kind, with its own fields and ``caption_templates``)."""

    kind: Literal["mix"] = "mix"
    mix: list[DataConfig] = field(default_factory=list)

    # a mix is for training on captions: its sources' label spaces differ, so it has none
    capabilities: ClassVar[SourceCapabilities] = UNLABELLED
    reader: ClassVar[str] = "clipforge.data.mix:read_mix"

    def reader_arguments(self) -> dict[str, Any]:
        return {"entries": self.mix}

    def input_paths(self) -> list[str]:
        return [path for entry in self.mix for path in entry.input_paths()]

    def check(self, prefix: str) -> None:
        if not self.mix:
            raise ConfigError(f"{prefix}.kind='mix' needs {prefix}.mix: a list of sources, each with a weight")
        for position, entry in enumerate(self.mix):
            where = f"{prefix}.mix[{position}]"
            if isinstance(entry, MixData):
                raise ConfigError(f"{where}: a mix cannot contain another mix")
            if not entry.capabilities.random_access:  # the mix's sampler draws images by index
                raise ConfigError(
                    f"{where}.kind={entry.kind!r}: a mix draws from map-style sources and shards stream; pack the "
                    "other sources into the shards instead (clipforge data pack)"
                )
            if not entry.weight > 0:  # also refuses NaN
                raise ConfigError(f"{where}.weight={entry.weight} must be positive")
            entry.validate(where)
