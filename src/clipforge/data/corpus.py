"""The built-in broad corpus: public-domain clip art, flags, desktop icons and Twemoji, captioned from metadata.

Four sources beside the emoji set (``clipforge.data.emoji``), each built once by its script in ``scripts/``
from Debian packages (Twemoji: an npm package) and shipped as package data in
``clipforge/data/corpus/<name>/``, so nothing outside the package is needed at run time:

- ``clipart``: Open Clip Art Library drawings (``openclipart-png``, captions from the RDF metadata of the
  ``openclipart-svg`` twins: English titles, descriptions, keywords and cleaned file names);
  ``scripts/build_clipart_set.py``.
- ``flags``: country and region flags (``iso-flags-png-320x240``) named from ``iso-codes``
  ("flag of France", "French Republic flag", "France"); ``scripts/build_flag_set.py``.
- ``icons``: freedesktop icon themes (Adwaita, Tango) captioned with their icon names as phrases
  ("audio-volume-high" -> "audio volume high"); ``scripts/build_icon_set.py``.
- ``twemoji``: the emoji of the emoji set drawn in a second art style, Twitter's Twemoji (CC BY 4.0, npm
  ``emoji-datasource-twitter``), with the emoji set's ``captions="all"`` captions, groups as categories, and
  its concepts and splits; ``scripts/build_twemoji_set.py``.

Each folder holds ``images.webp`` (one lossless WebP atlas of square RGB tiles on white, colour values
rounded to multiples of 8 first, as the emoji atlas), ``metadata.jsonl`` (one JSON object per image, in atlas
order: ``id``, ``captions``, ``category``, ``concept``, ``split``, ``origin``), ``info.json`` (tile size,
atlas columns, category names, counts), ``LICENSE-<name>.txt`` and ``README.md``.

Splits are by *concept*: items that are near-duplicates (the same drawing in other colours, the volume icon
at three levels, a flag two territories share) share a concept key and every concept goes whole to one
split (:func:`split_of_concept`). A flag whose country has an emoji flag takes that emoji's split, so a test
flag is never the picture of a training emoji flag. A Twemoji picture takes the concept and split of the
same emoji in the emoji set (not this module's hash), so a test emoji is test in both art styles.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.base import DataError, check_index
from clipforge.data.emoji import atlas_to_tiles

CORPUS_NAMES: tuple[str, ...] = ("clipart", "flags", "icons", "twemoji")
"""The shipped corpus sources, one folder each in ``clipforge/data/corpus/``."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
CORPUS_SPLITS: tuple[str, ...] = (*SPLITS, "all")
DATA_PACKAGE = "clipforge.data"
DATA_FOLDER = "corpus"
IMAGES_FILE = "images.webp"
METADATA_FILE = "metadata.jsonl"
INFO_FILE = "info.json"

# ----------------------------------------------------------------------------------------------
# The concept-level split
# ----------------------------------------------------------------------------------------------
TEST_FRACTION = 0.10
VAL_FRACTION = 0.10
# Fixed once, never to be changed (it would reshuffle every split); one salt for all corpus sources, so
# the same concept key lands in the same split in every source. Not the emoji salt: the two sets name
# their concepts differently, and flags, the one overlap, take the emoji split explicitly.
SPLIT_SALT = "clipforge-corpus-split-0"


def split_of_concept(concept: str) -> str:
    """``"test"`` when SHA-1(salt, concept) as a number in [0, 1) is below 0.1, ``"val"`` below 0.2, else ``"train"``.

    Deterministic across machines and Python versions (``hash()`` is salted per process).
    """
    digest = hashlib.sha1(f"{SPLIT_SALT}\n{concept}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    if unit < TEST_FRACTION:
        return "test"
    if unit < TEST_FRACTION + VAL_FRACTION:
        return "val"
    return "train"


# ----------------------------------------------------------------------------------------------
# Loading the packaged sources
# ----------------------------------------------------------------------------------------------
class PackedStrings:
    """A read-only list of strings kept as one UTF-8 byte array and offsets.

    NumPy arrays rather than a Python list: forked DataLoader workers touch the reference count of every
    Python object they read, which copies the pages of a list's strings into each worker. One byte array
    rather than a fixed-width ``np.str_`` array: the captions differ in length by 50x, and a ``str_`` array
    pads every one to the longest in UTF-32.
    """

    def __init__(self, strings: list[str]) -> None:
        encoded = [text.encode("utf-8") for text in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(item) for item in encoded])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.offsets.flags.writeable = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.data[start:end].tobytes().decode("utf-8")


@dataclass(frozen=True)
class CorpusSet:
    """The metadata of one packaged corpus source, row ``i`` of every array describing image ``i``.

    Captions are flattened: image ``i`` has captions ``captions[caption_offsets[i]:caption_offsets[i + 1]]``.
    The arrays are read-only because ``load_corpus`` hands the same cached object to every caller.
    """

    name: str
    tile_size: int  # the images are (tile_size, tile_size, 3) RGB
    columns: int  # tiles per atlas row
    classnames: list[str]  # the categories, ``category_index`` points into it
    ids: PackedStrings  # e.g. "animals/birds/owl_01"
    origins: PackedStrings  # where the picture comes from, for describe()
    captions: PackedStrings  # every caption of every image, image by image
    caption_offsets: np.ndarray  # (N + 1,) int64
    concepts: np.ndarray  # (N,) str, the split unit
    splits: np.ndarray  # (N,) str, "train" | "val" | "test"
    category_index: np.ndarray  # (N,) int64 into classnames

    def __len__(self) -> int:
        return len(self.concepts)

    def captions_of(self, row: int) -> list[str]:
        return [self.captions[k] for k in range(self.caption_offsets[row], self.caption_offsets[row + 1])]


def _check_name(name: str) -> str:
    if name not in CORPUS_NAMES:
        raise DataError(f"corpus source {name!r} does not exist; choose one of {list(CORPUS_NAMES)}")
    return name


def _data_file(name: str, filename: str):
    path = resources.files(DATA_PACKAGE).joinpath(DATA_FOLDER, name, filename)
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged corpus file {DATA_FOLDER}/{name}/{filename} is missing from {DATA_PACKAGE} ({path}); "
            f"reinstall clipforge or rebuild it with `python scripts/build_{_SCRIPT_STEM[name]}_set.py`"
        )
    return path


_SCRIPT_STEM = {"clipart": "clipart", "flags": "flag", "icons": "icon", "twemoji": "twemoji"}


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def read_info(name: str) -> dict[str, Any]:
    """The source's ``info.json``: tile_size, columns, classnames, count, split_counts, title."""
    return json.loads(_data_file(_check_name(name), INFO_FILE).read_text(encoding="utf-8"))


@functools.cache
def load_corpus(name: str) -> CorpusSet:
    """The metadata of corpus source ``name`` (cached per name: later calls return the same read-only object).

    The images are decoded separately, on first use (:func:`load_corpus_images`). Raises ``DataError`` for an
    unknown name, ``FileNotFoundError`` naming the file when the package data is missing.
    """
    info = read_info(name)
    text = _data_file(name, METADATA_FILE).read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    classnames = list(info["classnames"])
    position = {category: i for i, category in enumerate(classnames)}
    counts = [len(record["captions"]) for record in records]
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    return CorpusSet(
        name=name,
        tile_size=int(info["tile_size"]),
        columns=int(info["columns"]),
        classnames=classnames,
        ids=PackedStrings([record["id"] for record in records]),
        origins=PackedStrings([record["origin"] for record in records]),
        captions=PackedStrings([caption for record in records for caption in record["captions"]]),
        caption_offsets=_readonly(offsets),
        concepts=_readonly(np.array([record["concept"] for record in records], dtype=np.str_)),
        splits=_readonly(np.array([record["split"] for record in records], dtype=np.str_)),
        category_index=_readonly(np.array([position[record["category"]] for record in records], dtype=np.int64)),
    )


@functools.cache
def load_corpus_images(name: str) -> np.ndarray:
    """All images of corpus source ``name`` as one read-only (N, S, S, 3) uint8 array (decoded once, cached).

    Raises ``ValueError`` when the atlas holds fewer tiles than the metadata lists.
    """
    corpus = load_corpus(name)
    images_path = _data_file(name, IMAGES_FILE)
    with images_path.open("rb") as handle, Image.open(handle) as atlas_image:
        atlas = np.asarray(atlas_image.convert("RGB"))
    tile = corpus.tile_size
    capacity = (atlas.shape[0] // tile) * (atlas.shape[1] // tile)
    if capacity < len(corpus) or atlas.shape[1] != corpus.columns * tile:
        raise ValueError(
            f"{images_path} ({atlas.shape[1]}x{atlas.shape[0]} px, {capacity} tiles of {tile} px) does not fit the "
            f"{len(corpus)} images of {METADATA_FILE}; rebuild both with "
            f"`python scripts/build_{_SCRIPT_STEM[name]}_set.py`"
        )
    return _readonly(atlas_to_tiles(atlas, len(corpus), tile))


class CorpusSource:
    """One split of a built-in corpus source (``clipforge.data.corpus``), several captions per image.

    ``name``: one of :data:`CORPUS_NAMES`. ``split``: ``train`` | ``val`` | ``test`` (concept-disjoint) or
    ``all``. ``labels`` is the image's coarse category (index into ``classnames``: the clip-art folder, the
    icon context, the kind of flag, the emoji group). The atlas is decoded on the first ``load_image`` and
    shared by every source of that name in the process.
    """

    def __init__(self, name: str, split: str = "train") -> None:
        _check_name(name)
        if split not in CORPUS_SPLITS:
            raise DataError(f"corpus split {split!r} does not exist; choose one of {list(CORPUS_SPLITS)}")
        self.name = name
        self.split = split
        self._corpus = load_corpus(name)
        selected = np.ones(len(self._corpus), dtype=bool) if split == "all" else self._corpus.splits == split
        self.indices = np.flatnonzero(selected)  # (num_images,) rows of the full source
        self.concepts = self._corpus.concepts[self.indices]
        self.labels: np.ndarray | None = self._corpus.category_index[self.indices]
        self.classnames: list[str] | None = list(self._corpus.classnames)
        self.image_size = self._corpus.tile_size

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, index: int) -> Image.Image:
        """The square RGB tile on white; never raises ImageLoadError (the pixels come from the package)."""
        row = self.indices[check_index(index, len(self))]
        return Image.fromarray(load_corpus_images(self.name)[row], mode="RGB")

    def captions(self, index: int) -> list[str]:
        return self._corpus.captions_of(int(self.indices[check_index(index, len(self))]))

    def describe(self, index: int) -> str:
        row = int(self.indices[check_index(index, len(self))])
        return f"corpus {self.name} {self._corpus.ids[row]} (from {self._corpus.origins[row]})"
