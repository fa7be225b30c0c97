"""The data section's base: the fields every data kind shares, how ``kind`` picks a kind's class, what a source can do.

A data section is one small dataclass per ``data.kind`` (:mod:`clipforge.config.data_kinds`), holding that kind's
own fields on top of :class:`DataConfig`, which holds the fields every kind shares. Each kind class declares, as
class attributes, everything the rest of clipforge asks about it: its rules (:meth:`DataConfig.check`), the fields
that may not stay empty (``required``), the files it reads (``input_fields``), its reader (``reader``: the callable
in ``clipforge.data`` that builds the source, given :meth:`DataConfig.reader_arguments`) and its
:class:`SourceCapabilities`. A kind is registered once, with :func:`register_data_kind`; parsing, validation, the
source factory, evaluation, packing, the feature cache and the start-up checks all read that one table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from clipforge.config.errors import ConfigError
from clipforge.config.templates import validate_templates
from clipforge.io import shown

DEFAULT_DATA_KIND = "emoji"  # data.kind when none is given
# loader processes a config may ask for at all (each machine starts at most one per core: runtime.usable_workers)
MAX_WORKERS = 1024


@dataclass(frozen=True)
class SourceCapabilities:
    """What a source can do, so that callers ask it instead of testing its class or its kind.

    Each data kind declares its own (``DataConfig.capabilities``: config validation reads them before any file is
    opened) and so does each source class (``capabilities``, read through ``clipforge.data.base.capabilities_of``;
    a test keeps the two in step).

    ``random_access``: ``len(source)``, and ``load_image(i)`` / ``captions(i)`` / ``describe(i)`` by index (the
    ``ImageTextSource`` interface): the map-style loader, the start-up checks, caption templates and mixes need it.
    ``streaming``: the samples are read front to back from shards (``iter_samples``, ``iter_captions``; the
    ``StreamingSource`` interface), and the training loader streams them.
    ``labels``: the source can carry class labels (whether one does: ``source.labels is not None``); zero-shot
    classification needs them.
    ``packable``: ``clipforge data pack`` can write it as shards. ``evaluable``: evaluation can visit every image
    exactly once and look its captions up by index. ``cacheable``: the feature cache can key features by image index.
    """

    random_access: bool = True
    streaming: bool = False
    labels: bool = True
    packable: bool = True
    evaluable: bool = True
    cacheable: bool = True


MAP_STYLE = SourceCapabilities()  # images by index, maybe with labels
UNLABELLED = dataclasses.replace(MAP_STYLE, labels=False)  # images by index, captions only (coco, flickr, a mix)
# shards: front to back only; evaluation indexes them with one scan of their headers (clipforge.data.shard_index),
# the feature cache keys features by an index it cannot keep across epochs of a stream
STREAMED = SourceCapabilities(random_access=False, streaming=True, evaluable=True, cacheable=False)


@dataclass
class AugmentConfig:
    """Training-time augmentation; evaluation always uses resize + center crop.

    After the crop (and flip): ``color_jitter`` = s jitters brightness, contrast and saturation by factors drawn
    from [1 - s, 1 + s] (0 = off); ``grayscale`` is the probability of turning the image grey (kept as three
    equal channels); ``invert`` the probability of inverting it (light drawings on dark, as in MNIST-like data);
    ``low_res`` the probability of a low-resolution view: the crop is shrunk to a side drawn uniformly from
    ``LOW_RES_SIDES`` pixels and enlarged back, so the picture keeps only that much detail (the look of small
    thumbnails and 28-pixel datasets such as MNIST).
    """

    scale_min: float = 0.8  # RandomResizedCrop area range is (scale_min, 1.0)
    hflip: bool = False  # off by default: captions say "left" and "right"
    color_jitter: float = 0.0
    grayscale: float = 0.0
    invert: float = 0.0
    low_res: float = 0.0


LOW_RES_SIDES = (20, 40)  # AugmentConfig.low_res: the smallest and largest side of a low-resolution view

# every data kind, once, by name: filled by register_data_kind (clipforge.config.data_kinds registers the built-in
# ones); parsing, validation, the source factory and evaluation read it
DATA_KINDS: dict[str, type[DataConfig]] = {}


@dataclass
class DataConfig:
    """Where images and captions (or labels) come from: the fields every data kind shares.

    ``kind`` picks the kind's class (:mod:`clipforge.config.data_kinds`), which adds that kind's own fields
    (``path``, ``split`` ...). ``DataConfig(kind="manifest", path="pairs.csv")`` builds a ``ManifestData``, as
    parsing ``{kind: manifest, path: pairs.csv}`` does; a field the kind does not have is refused by name.

    ``caption_sampling``: training takes one caption per image visit: ``random`` draws it, ``cycle`` takes caption
    ``v mod n`` on the image's v-th visit. ``caption_templates``: ``str.format`` templates with one ``{}`` (e.g.
    ``"a drawing of {}."``); each caption ``c`` of the source is then also offered as ``t.format(c)`` for every
    template ``t``, so a sampled caption is the bare one with probability ``1 / (1 + len(caption_templates))``.
    Prompted queries ("a photo of a dress.") then meet captions of their own form in training, not bare names only.
    ``num_workers``: loader worker processes (0 = load in the main process; ``auto``: half of the cores this process
    may use, at most 8, see ``clipforge.cores.auto_workers``). ``weight``: the share of a ``mix``
    entry (``data.mix[i].weight``: entry i is drawn with probability weight_i / sum of weights).

    Feature cache (``clipforge.data.feature_cache``): with ``cache_features`` the features of a fully locked
    tower are computed once per sample and read from disk in training instead of running the tower: always
    for a locked text tower; for a locked image tower when its augmentation is deterministic
    (``augment.scale_min: 1``, no flip), or, with random augmentation, when ``cached_views`` = K > 0: K views
    per image are cached and visit ``v`` of an image reads view ``v mod K``. ``feature_cache``: the cache
    folder (empty = ``<train.output_dir>/feature_cache``); runs that share it share the entries whose tower,
    weights, preprocessing and data agree.
    """

    kind: str = DEFAULT_DATA_KIND
    caption_sampling: Literal["random", "cycle"] = "random"
    caption_templates: list[str] = field(default_factory=list)
    num_workers: int | Literal["auto"] = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_features: bool = True
    cached_views: int = 0
    feature_cache: str = ""
    weight: float = 1.0

    # what each kind declares (class attributes, not fields)
    capabilities: ClassVar[SourceCapabilities] = MAP_STYLE
    reader: ClassVar[str] = ""  # "clipforge.data.<module>:<callable>", called with reader_arguments() -> the source
    required: ClassVar[dict[str, str]] = {}  # field -> what it must name, for the fields that may not stay empty
    input_fields: ClassVar[tuple[str, ...]] = ()  # the fields that name files or folders the source reads

    def __new__(cls, *args: Any, **kwargs: Any) -> DataConfig:
        # DataConfig itself stands for the family: it builds the class of the kind asked for (pathlib.Path's way)
        if cls is DataConfig:
            cls = data_kind_class(args[0] if args else kwargs.get("kind", DEFAULT_DATA_KIND))
        return super().__new__(cls)

    # -- the kind's shape ------------------------------------------------------------------------
    @classmethod
    def kind_name(cls) -> str:
        """The ``kind`` this class stands for (its ``kind`` field's default)."""
        return cls.__dataclass_fields__["kind"].default

    @classmethod
    def shared_fields(cls) -> tuple[str, ...]:
        """The fields every kind has (besides ``kind``)."""
        return tuple(f.name for f in dataclasses.fields(DataConfig) if f.name != "kind")

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        """The fields of this kind alone, in declaration order."""
        shared = ("kind", *cls.shared_fields())
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in shared)

    @classmethod
    def ordered_fields(cls) -> tuple[str, ...]:
        """``kind``, the kind's own fields, then the shared ones: the order saved configs list them in."""
        return ("kind", *cls.own_fields(), *cls.shared_fields())

    def get(self, name: str, default: Any = None) -> Any:
        """The field ``name``'s value, or ``default`` when this kind has no such field (for code that reads any
        kind: messages, labels, file stamps)."""
        return getattr(self, name) if name in self.__dataclass_fields__ else default

    def input_paths(self) -> list[str]:
        """The files and folders this source reads (its ``input_fields`` that are set): what no command may write
        over."""
        return [value for value in (getattr(self, name) for name in self.input_fields) if value]

    def describe(self, prefix: str = "data") -> str:
        """``data.kind='manifest', data.path='train.csv'``: the data as the config names it, for messages."""
        where = f"{prefix}.kind={self.kind!r}"
        path = self.get("path", "")
        return f"{where}, {prefix}.path={path!r}" if path else where

    def reader_arguments(self) -> dict[str, Any]:
        """The keyword arguments of the kind's ``reader``: how this section's fields become a source."""
        raise NotImplementedError(f"data.kind={self.kind!r} names no reader arguments")

    # -- checks ----------------------------------------------------------------------------------
    def validate(self, prefix: str = "data") -> None:
        """The checks of this section (``prefix`` names it in messages: ``data``, ``eval.tasks[0].data``,
        ``data.mix[1]``): the kind's required fields, the shared fields, then the kind's own rules (:meth:`check`).
        Raises :class:`ConfigError` naming the first problem; touches no file."""
        for name, what in self.required.items():
            if not getattr(self, name):
                raise ConfigError(f"{prefix}.kind={self.kind!r} needs {prefix}.{name}: {what}")
        self._check_shared(prefix)
        self.check(prefix)

    def check(self, prefix: str) -> None:
        """The kind's own rules (a kind class overrides it; the base has none)."""

    def _check_shared(self, prefix: str) -> None:
        if self.num_workers == "auto":
            pass  # clipforge.cores.auto_workers, on the machine that runs
        elif self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers={self.num_workers} must be >= 0 (0 = load in the main process)")
        elif self.num_workers > MAX_WORKERS:
            raise ConfigError(
                f"{prefix}.num_workers={self.num_workers} is more than the {MAX_WORKERS} loader processes a config "
                "may ask for (a machine starts at most one per core)"
            )
        if self.cached_views < 0:
            raise ConfigError(f"{prefix}.cached_views={self.cached_views} must be >= 0 (0 = cache no random views)")
        _check_augment(self.augment, prefix)
        if self.caption_templates:
            if not self.capabilities.random_access:  # templated captions are looked up by image index
                raise ConfigError(
                    f"{prefix}.caption_templates: {prefix}.kind={self.kind!r} streams its samples, and shards stream "
                    "their captions as stored; write the templated captions into the shards (clipforge data pack) or "
                    "use a map-style source"
                )
            try:
                validate_templates(self.caption_templates)
            except ValueError as error:
                raise ConfigError(f"{prefix}.caption_templates: {error}") from None

    # -- parsing (clipforge.config.convert calls these) --------------------------------------------
    @classmethod
    def config_class_for(cls, values: dict[str, Any], prefix: str) -> type[DataConfig]:
        """The class that builds ``values``: the class of ``values['kind']`` when asked of :class:`DataConfig`
        itself, else ``cls`` (whose own ``kind`` field then refuses another kind)."""
        if cls is not DataConfig:
            return cls
        return data_kind_class(values.get("kind", DEFAULT_DATA_KIND), f"{prefix}.kind" if prefix else "kind")

    @classmethod
    def unknown_field_message(cls, key: str, value: Any, prefix: str) -> str | None:
        """Why ``key`` is refused when another kind has that field: this kind does not, so the setting would do
        nothing; the message names the kinds that have it and lists this kind's fields. None for a key no kind has
        (a typo: the parser's did-you-mean message)."""
        owners = [kind for kind, other in DATA_KINDS.items() if key in other.own_fields()]
        if cls is DataConfig or not owners:
            return None
        where = f"{prefix}." if prefix else ""
        kind = cls.kind_name()
        reason, fix = "", ""
        if key == "split" and "path" in cls.own_fields():
            reason, fix = f": it reads all of what {where}path names", f", or point {where}path at the split's own file"
        return (
            f"{where}{key}={shown(value)}: {where}kind={kind!r} has no {key}{reason}, so the setting would do nothing; "
            f"remove it{fix} (kinds with a {key}: {', '.join(owners)}). {kind} takes "
            f"{', '.join(cls.own_fields()) or 'no fields of its own'}; every kind takes {', '.join(cls.shared_fields())}"
        )


def _check_augment(augment: AugmentConfig, prefix: str) -> None:
    if not 0 < augment.scale_min <= 1:
        raise ConfigError(
            f"{prefix}.augment.scale_min={augment.scale_min} must lie in (0, 1]: the smallest crop area (1 = no crop)"
        )
    for name in ("color_jitter", "grayscale", "invert", "low_res"):
        value = getattr(augment, name)
        if not 0 <= value <= 1:
            what = "a jitter strength" if name == "color_jitter" else "a probability"
            raise ConfigError(f"{prefix}.augment.{name}={value} must lie in [0, 1]: {what} (0 = off)")


def register_data_kind(cls: type[DataConfig]) -> type[DataConfig]:
    """Class decorator: add the kind class ``cls`` to :data:`DATA_KINDS` under its ``kind``.

    Refuses (``TypeError``, at import) a class that is not a :class:`DataConfig` dataclass, names no reader, or whose
    kind is taken: a kind is declared once.
    """
    if not (isinstance(cls, type) and issubclass(cls, DataConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a DataConfig dataclass")
    kind = cls.kind_name()
    if not isinstance(kind, str) or kind in DATA_KINDS or not cls.reader.startswith("clipforge.data."):
        raise TypeError(f"data kind {kind!r} of {cls.__name__}: taken, not a name, or without a clipforge.data reader")
    DATA_KINDS[kind] = cls
    return cls


def data_kind_class(kind: Any, field_name: str = "data.kind") -> type[DataConfig]:
    """The class of the data kind ``kind``; :class:`ConfigError` listing the kinds when there is none."""
    if isinstance(kind, str) and kind in DATA_KINDS:
        return DATA_KINDS[kind]
    raise ConfigError(f"{field_name}={shown(kind)} is not allowed; choose one of {list(DATA_KINDS)}")
