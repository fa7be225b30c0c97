"""Image-text sources: where (image, captions) pairs come from, behind one small interface.

A source is a map from an image index to a decoded RGB picture and that image's captions. It does no
transforms and no tokenization (``transforms.py`` and ``tokenize.py`` do) and touches no file until an
image is asked for, so a manifest of a million rows opens in seconds and a missing file costs one
skipped sample (``ImageLoadError``), not a crashed run.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipforge.config import DataConfig
from clipforge.data.emoji import GROUPS, load_emoji_set
from clipforge.data.tables import CaptionTable, StringTable


class ImageLoadError(Exception):
    """An image that cannot be used; the message names the file (or key) and why."""


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto white, 16-bit values scaled (not clipped)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255, which turns every mid-grey white.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)  # 65535 / 255 = 257
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0  # float images come in [0, 1] or [0, 255]
        grey = np.clip(np.round(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")  # also applies a palette's or a tRNS chunk's transparent colour
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # L, 1, P, CMYK (Pillow already undid Adobe's inverted CMYK JPEGs), YCbCr


def decode_image(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> Image.Image:
    """Open an image file (or its bytes) fully and return it upright, in RGB.

    EXIF orientation is applied (``ImageOps.exif_transpose``); alpha (RGBA, LA, palette or single-colour
    transparency) is composited onto white; CMYK, palette, greyscale and 1-bit images are converted;
    16-bit greyscale (``I;16``, ``I``) is scaled to 8 bits (value / 257), not clipped. The pixels are
    decoded here (``load()``), so a truncated file fails here and not later inside a transform.

    Raises ``ImageLoadError`` naming the file and the reason: missing, unreadable, not an image,
    truncated or corrupt, or too large for Pillow's decompression-bomb guard.
    """
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    label = f"<{len(path_or_bytes)} bytes>" if is_bytes else str(path_or_bytes)
    try:
        handle = io.BytesIO(bytes(path_or_bytes)) if is_bytes else open(path_or_bytes, "rb")
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: image file is missing") from None
    except OSError as error:
        raise ImageLoadError(f"{label}: cannot read the file ({error.strerror or error})") from error
    with handle:
        try:
            with Image.open(handle) as image:
                image.load()
                upright = _exif_upright(image)
                return _to_rgb(upright)
        except UnidentifiedImageError:
            raise ImageLoadError(f"{label}: not an image Pillow can identify (corrupt, or not an image)") from None
        except Image.DecompressionBombError as error:
            raise ImageLoadError(f"{label}: too large to decode safely ({error})") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            # Pillow reports truncation as OSError("image file is truncated ...") and broken streams as
            # SyntaxError/ValueError depending on the codec; all mean the pixels cannot be trusted.
            raise ImageLoadError(f"{label}: truncated or corrupt image data ({error})") from error


def _exif_upright(image: Image.Image) -> Image.Image:
    """The image rotated/flipped as its EXIF orientation says; a broken EXIF block leaves it as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # the pixels are fine; only the orientation tag is unreadable
        return image.copy()


# ----------------------------------------------------------------------------------------------
# The interface the loader consumes
# ----------------------------------------------------------------------------------------------
@runtime_checkable
class ImageTextSource(Protocol):
    """Images with one or more captions each, and optionally a class label per image.

    ``labels``: (num_images,) int class ids into ``classnames``, or None when the source has no classes.
    """

    labels: np.ndarray | None
    classnames: list[str] | None

    def __len__(self) -> int:
        """Number of images (not captions)."""
        ...

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` in RGB; raises ``ImageLoadError`` when it is missing or cannot be decoded."""
        ...

    def captions(self, index: int) -> list[str]:
        """All captions of image ``index`` (at least one)."""
        ...

    def describe(self, index: int) -> str:
        """Where image ``index`` comes from (a path or a key), for logs and error reports."""
        ...


def _check_index(index: int, length: int) -> int:
    if not 0 <= index < length:
        raise IndexError(f"image index {index} is out of range for a source of {length} images")
    return int(index)


# ----------------------------------------------------------------------------------------------
# The built-in emoji set
# ----------------------------------------------------------------------------------------------
EMOJI_SPLITS = ("train", "val", "test", "all")


class EmojiSource:
    """One split of the built-in emoji set (``clipforge.data.emoji``): caption = the emoji's Unicode name.

    ``split``: ``train`` | ``val`` | ``test`` (concept-disjoint) or ``all``. ``labels`` is the emoji's
    group (index into ``classnames`` = the 9 groups), for zero-shot group classification.
    """

    def __init__(self, split: str = "train") -> None:
        if split not in EMOJI_SPLITS:
            raise ValueError(f"emoji split {split!r} does not exist; choose one of {list(EMOJI_SPLITS)}")
        self.split = split
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
        row = self.indices[_check_index(index, len(self))]
        return Image.fromarray(self._emoji.images[row], mode="RGB")

    def captions(self, index: int) -> list[str]:
        return [str(self.names[_check_index(index, len(self))])]

    def describe(self, index: int) -> str:
        row = self.indices[_check_index(index, len(self))]
        return f"emoji U+{self._emoji.codepoints[row].replace(' ', ' U+')} ({self._emoji.names[row]})"


# ----------------------------------------------------------------------------------------------
# CSV / TSV / JSONL manifests
# ----------------------------------------------------------------------------------------------
MANIFEST_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl"}


class ManifestSource:
    """Images and captions listed in a CSV (``.csv``), TSV (``.tsv``/``.tab``) or JSON Lines (``.jsonl``) file.

    Columns: ``image``, a path relative to the manifest's folder (absolute paths are kept), and ``caption``.
    Several rows naming the same image are several captions of it (images and captions keep the order
    they first appear in); a JSONL row may give ``captions: [...]`` instead. An optional ``label`` column
    makes it a classification set: all-integer labels are used as they are (``classnames`` is None),
    anything else is a class name, numbered in sorted order (``classnames`` sorted).

    Rows whose caption (or image) is empty are skipped and counted in ``skipped_rows``. TSV fields are read
    verbatim (no quote handling), as TSV caption dumps put quotes inside captions unescaped.
    Images are not opened or checked here: ``load_image`` raises ``ImageLoadError`` for a bad one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest file {str(self.path)!r} does not exist (or is not a file)")
        kind = MANIFEST_FORMATS.get(self.path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"manifest {self.path}: unknown extension {self.path.suffix!r}; use one of {sorted(MANIFEST_FORMATS)}"
            )
        rows = self._read_jsonl() if kind == "jsonl" else self._read_delimited(kind)
        root = self.path.parent
        position: dict[str, int] = {}  # image path -> image index, in first-appearance order
        captions_of: list[list[str]] = []
        label_of: list[object] = []
        self.skipped_rows = 0
        row_count = 0
        for line, image, captions, label in rows:
            row_count += 1
            captions = [text.strip() for text in captions if text.strip()]
            image = image.strip()
            if not image or not captions:
                self.skipped_rows += 1
                continue
            key = os.path.normpath(os.path.join(root, image))
            if key not in position:
                position[key] = len(captions_of)
                captions_of.append([])
                label_of.append(label)
            index = position[key]
            captions_of[index].extend(captions)
            if label != label_of[index]:
                raise ValueError(
                    f"manifest {self.path}, line {line}: image {image!r} has label {label!r} here but "
                    f"{label_of[index]!r} on an earlier row; an image has one label"
                )
        if row_count == 0:
            raise ValueError(f"manifest {self.path} is empty: it has no data rows")
        if not captions_of:
            raise ValueError(
                f"manifest {self.path}: all {row_count} rows were skipped for an empty caption or image path"
            )
        self._images = StringTable(list(position))
        self._captions = CaptionTable(captions_of)
        self.caption_offsets = self._captions.offsets  # [i]:[i + 1] are the captions of image i
        self.labels, self.classnames = self._encode_labels(label_of)

    # -- reading -------------------------------------------------------------------------------
    def _missing_columns(self, found: Sequence[str], expected: str, line: int | None = None) -> ValueError:
        where = f"manifest {self.path}" + (f", line {line}" if line is not None else "")
        return ValueError(f"{where}: needs the columns {expected}; found {list(found)}")

    def _read_delimited(self, kind: str) -> Iterator[tuple[int, str, list[str], object]]:
        quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
        delimiter = "\t" if kind == "tsv" else ","
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would rename the first column
        with open(self.path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
            header = [column.strip() for column in next(reader, [])]
            if not header:
                raise ValueError(f"manifest {self.path} is empty: no header row with 'image' and 'caption'")
            if "image" not in header or "caption" not in header:
                raise self._missing_columns(header, "'image' and 'caption' (optional: 'label')")
            image_at, caption_at = header.index("image"), header.index("caption")
            label_at = header.index("label") if "label" in header else None
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line, not a data row
                row = row + [""] * (len(header) - len(row))  # a short row's missing cells are empty
                label = row[label_at].strip() if label_at is not None else None
                if label == "":
                    raise ValueError(f"manifest {self.path}, line {reader.line_num}: empty 'label'")
                yield reader.line_num, row[image_at], [row[caption_at]], label

    def _read_jsonl(self) -> Iterator[tuple[int, str, list[str], object]]:
        expected = "'image' and 'caption' (a string) or 'captions' (a list of strings); optional: 'label'"
        with open(self.path, encoding="utf-8-sig") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"manifest {self.path}, line {line}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"manifest {self.path}, line {line}: expected a JSON object, got {row!r:.60}")
                if "image" not in row or ("caption" not in row and "captions" not in row):
                    raise self._missing_columns(sorted(row), expected, line)
                captions = row["captions"] if "captions" in row else [row["caption"]]
                captions = [captions] if isinstance(captions, str) else captions
                if not isinstance(captions, list) or not all(isinstance(c, str) or c is None for c in captions):
                    raise ValueError(
                        f"manifest {self.path}, line {line}: captions must be strings, got {captions!r:.80}"
                    )
                label = row.get("label")
                if "label" in row and (label is None or label == ""):
                    raise ValueError(f"manifest {self.path}, line {line}: empty 'label'")
                yield line, str(row["image"]), [c or "" for c in captions], label

    def _encode_labels(self, raw: list[object]) -> tuple[np.ndarray | None, list[str] | None]:
        present = [label is not None for label in raw]
        if not any(present):
            return None, None
        if not all(present):
            missing = self._images[present.index(False)]
            raise ValueError(f"manifest {self.path}: image {missing!r} has no 'label' but other images do")
        try:
            return np.array([int(label) for label in raw], dtype=np.int64), None
        except (TypeError, ValueError):
            classnames = sorted({str(label) for label in raw})
            number = {name: i for i, name in enumerate(classnames)}
            return np.array([number[str(label)] for label in raw], dtype=np.int64), classnames

    # -- the source interface ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_captions(self) -> int:
        return self._captions.num_captions

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self._images[_check_index(index, len(self))])

    def captions(self, index: int) -> list[str]:
        index = _check_index(index, len(self))
        return self._captions[index]

    def describe(self, index: int) -> str:
        return self._images[_check_index(index, len(self))]


# ----------------------------------------------------------------------------------------------
# From a data config to a source
# ----------------------------------------------------------------------------------------------
def _lazy(module: str, name: str) -> Callable:
    """``clipforge.data.<module>.<name>``, imported on first use: those modules import this one."""
    return getattr(importlib.import_module(f"clipforge.data.{module}"), name)


def _build_mix(config: DataConfig) -> ImageTextSource:
    if any(entry.kind == "webdataset" for entry in config.mix):
        raise ValueError("data.kind='mix' draws from map-style sources; webdataset shards stream and cannot be mixed")
    sources = [build_source(entry) for entry in config.mix]
    return _lazy("mix", "MixSource")(sources, [entry.weight for entry in config.mix])


SOURCE_BUILDERS: dict[str, Callable[[DataConfig], ImageTextSource]] = {
    "emoji": lambda c: EmojiSource(c.split),
    "manifest": lambda c: ManifestSource(c.path),
    "coco": lambda c: _lazy("captioned", "read_coco")(c.path, c.image_root),
    "flickr": lambda c: _lazy("captioned", "read_flickr")(c.path, c.image_root, c.split),
    "imagefolder": lambda c: _lazy("classification", "ImageFolderSource")(c.path, c.classnames),
    "idx": lambda c: _lazy("classification", "read_idx")(c.path, c.classnames),
    "cifar": lambda c: _lazy("classification", "read_cifar")(c.path, c.split, c.classnames),
    "hf": lambda c: _lazy("hf", "HFSource")(
        c.path, c.split, c.image_column, c.caption_column, c.label_column, c.image_root, c.classnames
    ),
    "mix": _build_mix,
    "webdataset": lambda c: _lazy("shards", "ShardSource")(c.path, c.shuffle_buffer, c.resample, c.epoch_size),
}


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
