"""The built-in emoji image-caption set: Noto Color Emoji pictures captioned with their Unicode names.

Every fully-qualified emoji of Unicode's ``emoji-test.txt`` (3,655 emoji in 9 groups) rendered at 64x64
RGB on white by ``scripts/build_emoji_set.py`` and shipped as package data in ``clipforge/data/emoji/``
(``images.webp``: one lossless WebP atlas of the tiles, colour values rounded to multiples of 8 first, so
at most 4/255 off the rendering; 4.7 MB. ``metadata.jsonl``: one JSON object per emoji), so nothing outside
the package is needed at run time.

The split is by *concept*, not by emoji: the skin-tone, hair and gender variants of one emoji ("cook",
"man cook", "woman cook: medium skin tone") share a concept key, and every concept goes whole to one split.
A test emoji is then never a recoloured or regendered copy of a training one.

Extra captions: the metadata also holds each emoji's CLDR English keywords and text-to-speech name
(``keywords``, ``tts``; empty for the 31 Emoji 15.0 additions the CLDR 41 release lacks).
``EmojiSource(split, captions="all")`` adds them to the Unicode name; the default ``captions="name"`` keeps
the one-name captions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np
from PIL import Image

from clipforge.data.base import DataError, check_index

GROUPS: tuple[str, ...] = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
"""The 9 emoji groups in ``emoji-test.txt`` order ("Component" holds no fully-qualified emoji)."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
Split = Literal["train", "val", "test"]

IMAGE_SIZE = 64
ATLAS_COLUMNS = 60  # tiles per atlas row; 60 * 64 px keeps the WebP atlas far below its 16,383 px limit
DATA_PACKAGE = "clipforge.data"
DATA_FOLDER = "emoji"
IMAGES_FILE = "images.webp"
METADATA_FILE = "metadata.jsonl"

# ----------------------------------------------------------------------------------------------
# Concept keys
# ----------------------------------------------------------------------------------------------
SKIN_TONES = frozenset(
    {"light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone", "dark skin tone"}
)
HAIR_STYLES = frozenset({"red hair", "curly hair", "white hair", "blond hair", "bald", "beard"})
# Who is in a multi-person emoji ("kiss: woman, man", "family: man, girl, boy") is a gender/composition
# variant of the same picture, so these qualifiers go too.
PEOPLE_WORDS = frozenset({"man", "woman", "person", "boy", "girl"})
_DROPPED_QUALIFIERS = SKIN_TONES | HAIR_STYLES | PEOPLE_WORDS

# Gendered variants that are different words rather than a "man "/"woman " prefix; the key of each
# tuple is its first entry. Chosen by reading every People & Body and Symbols name in emoji-test.txt 15.0.
_GENDER_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("person", "man", "woman"),
    ("child", "boy", "girl"),
    ("older person", "old man", "old woman"),
    ("person with crown", "prince", "princess"),
    ("mx claus", "Santa Claus", "Mrs. Claus"),
    ("merperson", "merman", "mermaid"),
    ("restroom", "men’s room", "women’s room"),
    ("gender sign", "female sign", "male sign"),
)
_SYNONYM_KEY = {name: group[0] for group in _GENDER_SYNONYMS for name in group}
# Longest first, so "woman and man holding hands" loses the whole pair, not just "woman ".
_LEADING_PEOPLE = ("woman and man ", "person ", "people ", "woman ", "women ", "man ", "men ")
_TRAILING_GENDER = re.compile(r" (?:man|woman)$")  # "deaf man", "pregnant woman" -> "... person"


def concept_key(name: str) -> str:
    """The concept an emoji name belongs to: the name without its skin-tone, hair and gender variation.

    1. After the first ": ", drop the comma-separated qualifiers that are skin tones, hair styles
       (including "bald" and "beard") or people ("man", "woman", "person", "boy", "girl"); keep the
       rest ("flag: Paraguay" and "keycap: 1" stay whole, "kiss: woman, man, dark skin tone" -> "kiss").
    2. Map gendered word pairs to one key ("prince"/"princess" -> "person with crown", "man" -> "person").
    3. Otherwise drop one leading "man "/"woman "/"person "/"men "/"women "/"people "/"woman and man "
       ("woman cook" -> "cook") and turn a trailing " man"/" woman" into " person" ("deaf man" -> "deaf person").
    """
    base, sep, qualifiers = name.partition(": ")
    if sep:
        kept = [part for part in qualifiers.split(", ") if part not in _DROPPED_QUALIFIERS]
        if kept:
            return f"{base}: {', '.join(kept)}"
    if base in _SYNONYM_KEY:
        return _SYNONYM_KEY[base]
    for prefix in _LEADING_PEOPLE:
        if base.startswith(prefix) and len(base) > len(prefix):
            base = base[len(prefix) :]
            break
    return _TRAILING_GENDER.sub(" person", base)


# ----------------------------------------------------------------------------------------------
# The concept-level split
# ----------------------------------------------------------------------------------------------
TEST_FRACTION = 0.10
VAL_FRACTION = 0.10
# Fixed once, never to be changed (it would reshuffle every split): the first k in "clipforge-emoji-split-<k>"
# (k = 0, 1, ...) for which the test split holds all 9 groups and 7-14% of the emoji. k = 0 already does
# (11.4% of emoji, every group present), so no search beyond it was needed.
SPLIT_SALT = "clipforge-emoji-split-0"


def _unit_hash(concept: str) -> float:
    """A stable number in [0, 1) from SHA-1 (``hash()`` is salted per process, so it cannot be used)."""
    digest = hashlib.sha1(f"{SPLIT_SALT}\n{concept}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of_concept(concept: str) -> Split:
    """``"test"`` for the ~10% of concepts whose hash falls in [0, 0.1), ``"val"`` for [0.1, 0.2), else ``"train"``.

    Deterministic across machines and Python versions; val is thus carved from the non-test concepts.
    """
    unit = _unit_hash(concept)
    if unit < TEST_FRACTION:
        return "test"
    if unit < TEST_FRACTION + VAL_FRACTION:
        return "val"
    return "train"


# ----------------------------------------------------------------------------------------------
# Loading the packaged set
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmojiSet:
    """All packaged emoji, row ``i`` of every array describing emoji ``i``.

    The arrays are NumPy arrays rather than lists: forked DataLoader workers touch the reference count
    of every Python object they read, which copies the pages holding a list's strings into each worker.
    They are read-only because ``load_emoji_set`` hands the same cached object to every caller.
    """

    images: np.ndarray  # (N, 64, 64, 3) uint8 RGB on white
    codepoints: np.ndarray  # (N,) str, e.g. "1F468 200D 1F373"
    names: np.ndarray  # (N,) str, the Unicode name, e.g. "man cook"
    groups: np.ndarray  # (N,) str, one of GROUPS
    subgroups: np.ndarray  # (N,) str, e.g. "person-role"
    concepts: np.ndarray  # (N,) str, concept_key(name)
    splits: np.ndarray  # (N,) str, "train" | "val" | "test"
    group_index: np.ndarray  # (N,) int64 index into GROUPS
    keywords: np.ndarray  # (N,) str, the CLDR keywords joined by KEYWORD_SEPARATOR ("face | grin | grinning face")
    tts: np.ndarray  # (N,) str, the CLDR text-to-speech name ("" where CLDR lacks the emoji)

    def __len__(self) -> int:
        return len(self.names)


def _data_file(filename: str):
    path = resources.files(DATA_PACKAGE).joinpath(DATA_FOLDER, filename)
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged emoji file {DATA_FOLDER}/{filename} is missing from {DATA_PACKAGE} ({path}); "
            "reinstall clipforge or rebuild it with `python scripts/build_emoji_set.py`"
        )
    return path


def atlas_to_tiles(atlas: np.ndarray, count: int, tile: int = IMAGE_SIZE) -> np.ndarray:
    """Cut a (rows * tile, columns * tile, 3) atlas into (count, tile, tile, 3) tiles, row-major."""
    rows, columns = atlas.shape[0] // tile, atlas.shape[1] // tile
    tiles = atlas.reshape(rows, tile, columns, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    return np.ascontiguousarray(tiles[:count])


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=1)
def load_emoji_set() -> EmojiSet:
    """Load the packaged emoji set (cached: later calls return the same read-only arrays).

    Raises ``FileNotFoundError`` naming the file when the package data is missing, ``ValueError`` when
    the images and metadata disagree.
    """
    metadata_path = _data_file(METADATA_FILE)
    images_path = _data_file(IMAGES_FILE)
    records = [json.loads(line) for line in metadata_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with images_path.open("rb") as handle, Image.open(handle) as atlas_image:
        atlas = np.asarray(atlas_image.convert("RGB"))
    capacity = (atlas.shape[0] // IMAGE_SIZE) * (atlas.shape[1] // IMAGE_SIZE)
    if capacity < len(records) or len(records) == 0:
        raise ValueError(
            f"{images_path} holds {capacity} tiles but {metadata_path} lists {len(records)} emoji; rebuild both "
            "with `python scripts/build_emoji_set.py`"
        )
    group_position = {group: i for i, group in enumerate(GROUPS)}

    def column(key: str) -> np.ndarray:
        return _readonly(np.array([record[key] for record in records], dtype=np.str_))

    return EmojiSet(
        images=_readonly(atlas_to_tiles(atlas, len(records))),
        codepoints=column("codepoints"),
        names=column("name"),
        groups=column("group"),
        subgroups=column("subgroup"),
        concepts=column("concept"),
        splits=column("split"),
        group_index=_readonly(np.array([group_position[record["group"]] for record in records], dtype=np.int64)),
        keywords=_readonly(
            np.array([KEYWORD_SEPARATOR.join(record.get("keywords", [])) for record in records], dtype=np.str_)
        ),
        tts=_readonly(np.array([record.get("tts", "") for record in records], dtype=np.str_)),
    )


EMOJI_SPLITS = ("train", "val", "test", "all")
CAPTION_CHOICES = ("name", "all")
KEYWORD_SEPARATOR = " | "  # as CLDR writes them; no keyword contains a "|"


def emoji_captions(name: str, tts: str, keywords: str) -> list[str]:
    """The ``captions="all"`` list: the Unicode name, the CLDR tts name and the CLDR keywords as one phrase.

    Each is added only when it says something new: the tts name when it differs from the name (in CLDR 41 it
    never does), the keywords without those equal to the name or tts, joined by ", " ("face, grin"), so one
    caption names the picture's several aspects instead of many one-word captions ("face") that half the
    faces in a batch would share.
    """
    captions = [name]
    if tts and tts.casefold() != name.casefold():
        captions.append(tts)
    said = {caption.casefold() for caption in captions}
    extra = [word for word in keywords.split(KEYWORD_SEPARATOR) if word and word.casefold() not in said]
    if extra:
        captions.append(", ".join(extra))
    return captions


class EmojiSource:
    """One split of the built-in emoji set (``clipforge.data.emoji``): caption = the emoji's Unicode name.

    ``split``: ``train`` | ``val`` | ``test`` (concept-disjoint) or ``all``. ``labels`` is the emoji's
    group (index into ``classnames`` = the 9 groups), for zero-shot group classification.
    ``captions``: ``"name"`` (the Unicode name alone) or ``"all"`` (also the CLDR keywords and tts name,
    see :func:`emoji_captions`); the split and the images are the same either way.
    """

    def __init__(self, split: str = "train", captions: str = "name") -> None:
        if split not in EMOJI_SPLITS:
            raise DataError(f"emoji split {split!r} does not exist; choose one of {list(EMOJI_SPLITS)}")
        if captions not in CAPTION_CHOICES:
            raise DataError(
                f"emoji captions={captions!r} is not a choice: 'name' (the Unicode name) or 'all' "
                "(also the CLDR keywords and text-to-speech name)"
            )
        self.split = split
        self.caption_choice = captions
        self._emoji = load_emoji_set()
        selected = np.ones(len(self._emoji), dtype=bool) if split == "all" else self._emoji.splits == split
        self.indices = np.flatnonzero(selected)  # (num_images,) rows of the full set
        self.names = self._emoji.names[self.indices]
        self.groups = self._emoji.groups[self.indices]
        self.concepts = self._emoji.concepts[self.indices]
        self.labels: np.ndarray | None = self._emoji.group_index[self.indices]
        self.classnames: list[str] | None = list(GROUPS)

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, index: int) -> Image.Image:
        """The 64x64 RGB emoji; never raises ImageLoadError (the pixels are already in memory)."""
        row = self.indices[check_index(index, len(self))]
        return Image.fromarray(self._emoji.images[row], mode="RGB")

    def captions(self, index: int) -> list[str]:
        position = check_index(index, len(self))
        if self.caption_choice == "name":
            return [str(self.names[position])]
        row = self.indices[position]
        return emoji_captions(str(self._emoji.names[row]), str(self._emoji.tts[row]), str(self._emoji.keywords[row]))

    def describe(self, index: int) -> str:
        row = self.indices[check_index(index, len(self))]
        return f"emoji U+{self._emoji.codepoints[row].replace(' ', ' U+')} ({self._emoji.names[row]})"
