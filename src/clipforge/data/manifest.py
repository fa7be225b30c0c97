"""CSV / TSV / JSONL manifests: image paths with one or more captions (and optionally a label) each."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.base import DataError, bounded_text, check_index, decode_image
from clipforge.data.files import bounded_lines, not_utf8
from clipforge.data.tables import CaptionTable, StringTable
from clipforge.io import shown

logger = logging.getLogger("clipforge")

MANIFEST_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl"}
_SHOWN_LINES = 5  # line numbers of skipped rows named in the warning; the rest are only counted


@dataclass(frozen=True)
class ManifestColumns:
    """The column names (CSV/TSV header names, JSONL keys) a manifest is read by: ``data.image_column``,
    ``data.caption_column`` and ``data.label_column``. In JSONL, the caption key's plural (``captions``
    for ``caption``) may hold a list of captions instead."""

    image: str = "image"
    caption: str = "caption"
    label: str = "label"

    @property
    def captions(self) -> str:
        return f"{self.caption}s"

    def describe(self, jsonl: bool) -> str:
        """The columns a row needs, for error messages."""
        if jsonl:
            return (
                f"{self.image!r} and {self.caption!r} (a string) or {self.captions!r} (a list of strings); "
                f"optional: {self.label!r}"
            )
        return f"{self.image!r} and {self.caption!r} (optional: {self.label!r})"


class ManifestSource:
    """Images and captions listed in a CSV (``.csv``), TSV (``.tsv``/``.tab``) or JSON Lines (``.jsonl``) file.

    Columns (renamed by ``columns``, i.e. ``data.image_column`` / ``caption_column`` / ``label_column``):
    ``image``, a path relative to the manifest's folder (absolute paths are kept), and ``caption``.
    Several rows naming the same image are several captions of it (images and captions keep the order
    they first appear in); a JSONL row may give ``captions: [...]`` instead. An optional ``label`` column
    makes it a classification set: all-integer labels are used as they are (``classnames`` is None),
    anything else is a class name, numbered in sorted order (``classnames`` sorted).

    Rows whose caption (or image) is empty are skipped, counted in ``skipped_rows`` and reported in one
    warning naming the first lines. TSV fields are read verbatim (no quote handling), as TSV caption dumps
    put quotes inside captions unescaped. The file must be UTF-8 (a ``DataError`` names the line of the first
    byte that is not). Images are not opened or checked here: ``load_image`` raises ``ImageLoadError`` for a
    bad one.
    """

    def __init__(self, path: str | os.PathLike, columns: ManifestColumns | None = None) -> None:
        self.path = Path(path)
        self.columns = columns or ManifestColumns()
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest file {str(self.path)!r} does not exist (or is not a file)")
        kind = MANIFEST_FORMATS.get(self.path.suffix.lower())
        if kind is None:
            raise DataError(
                f"manifest {self.path}: unknown extension {self.path.suffix!r}; use one of {sorted(MANIFEST_FORMATS)}"
            )
        try:
            captions_of, label_of = self._group_rows(
                self._read_jsonl() if kind == "jsonl" else self._read_delimited(kind)
            )
        except UnicodeDecodeError:
            raise not_utf8(self.path, f"manifest {self.path}") from None
        self._captions = CaptionTable(list(captions_of.values()))
        self._images = StringTable(list(captions_of))
        self.caption_offsets = self._captions.offsets  # [i]:[i + 1] are the captions of image i
        self.labels, self.classnames = self._encode_labels(label_of)

    def _group_rows(self, rows: Iterator[tuple[int, str, list[str], object]]) -> tuple[dict[str, list[str]], list]:
        """Captions grouped by image (first-appearance order) and each image's label; empty rows counted."""
        root = self.path.parent
        captions_of: dict[str, list[str]] = {}  # normalized image path -> its captions, in first-appearance order
        label_of: dict[str, object] = {}
        skipped_lines: list[int] = []
        row_count = 0
        for line, image, captions, label in rows:
            row_count += 1
            captions = [bounded_text(text.strip()) for text in captions if text.strip()]
            image = image.strip()
            if not image or not captions:
                skipped_lines.append(line)
                continue
            key = os.path.normpath(os.path.join(root, image))
            if key not in captions_of:
                captions_of[key], label_of[key] = [], label
            captions_of[key].extend(captions)
            if label != label_of[key]:
                raise DataError(
                    f"manifest {self.path}, line {line}: image {image!r} has label {label!r} here but "
                    f"{label_of[key]!r} on an earlier row; an image has one label"
                )
        self.skipped_rows = len(skipped_lines)
        if row_count == 0:
            raise DataError(f"manifest {self.path} is empty: it has no data rows")
        shown = ", ".join(str(line) for line in skipped_lines[:_SHOWN_LINES])
        more = ", ..." if len(skipped_lines) > _SHOWN_LINES else ""
        if not captions_of:
            raise DataError(
                f"manifest {self.path}: all {row_count} rows were skipped for an empty caption or image path "
                f"(lines {shown}{more}); fill in the {self.columns.image!r} and {self.columns.caption!r} columns"
            )
        if skipped_lines:
            logger.warning(
                "manifest %s: skipped %d of %d rows for an empty caption or image path (lines %s%s)",
                self.path,
                len(skipped_lines),
                row_count,
                shown,
                more,
            )
        return captions_of, list(label_of.values())

    # -- reading -------------------------------------------------------------------------------
    def _missing_columns(self, found: Sequence[str], jsonl: bool, line: int | None = None) -> DataError:
        where = f"manifest {self.path}" + (f", line {line}" if line is not None else "")
        return DataError(
            f"{where}: needs the columns {self.columns.describe(jsonl)}; found {list(found)}; "
            "set data.image_column / data.caption_column to the manifest's own column names"
        )

    def _read_delimited(self, kind: str) -> Iterator[tuple[int, str, list[str], object]]:
        quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
        delimiter = "\t" if kind == "tsv" else ","
        names = self.columns
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would rename the first column
        with open(self.path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(bounded_lines(handle, f"manifest {self.path}"), delimiter=delimiter, quoting=quoting)
            header = [column.strip() for column in next(reader, [])]
            if not header:
                raise DataError(
                    f"manifest {self.path} is empty: no header row with {names.image!r} and {names.caption!r}"
                )
            if names.image not in header or names.caption not in header:
                raise self._missing_columns(header, jsonl=False)
            image_at, caption_at = header.index(names.image), header.index(names.caption)
            label_at = header.index(names.label) if names.label in header else None
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line, not a data row
                row = row + [""] * (len(header) - len(row))  # a short row's missing cells are empty
                label = row[label_at].strip() if label_at is not None else None
                if label == "":
                    raise DataError(f"manifest {self.path}, line {reader.line_num}: empty {names.label!r}")
                yield reader.line_num, row[image_at], [row[caption_at]], label

    def _read_jsonl(self) -> Iterator[tuple[int, str, list[str], object]]:
        names = self.columns
        with open(self.path, encoding="utf-8-sig") as handle:
            for line, text in enumerate(bounded_lines(handle, f"manifest {self.path}"), start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DataError(f"manifest {self.path}, line {line}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"manifest {self.path}, line {line}: expected a JSON object, got {shown(row)}")
                if names.image not in row or (names.caption not in row and names.captions not in row):
                    raise self._missing_columns(sorted(row), jsonl=True, line=line)
                captions = row[names.captions] if names.captions in row else [row[names.caption]]
                captions = [captions] if isinstance(captions, str) else captions
                if not isinstance(captions, list) or not all(isinstance(c, str) or c is None for c in captions):
                    raise DataError(
                        f"manifest {self.path}, line {line}: captions must be strings, got {shown(captions)}"
                    )
                label = row.get(names.label)
                if names.label in row and (label is None or label == ""):
                    raise DataError(f"manifest {self.path}, line {line}: empty {names.label!r}")
                yield line, str(row[names.image]), [c or "" for c in captions], label

    def _encode_labels(self, raw: list[object]) -> tuple[np.ndarray | None, list[str] | None]:
        present = [label is not None for label in raw]
        if not any(present):
            return None, None
        if not all(present):
            missing = self._images[present.index(False)]
            raise DataError(
                f"manifest {self.path}: image {missing!r} has no {self.columns.label!r} but other images do"
            )
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
        return decode_image(self._images[check_index(index, len(self))])

    def captions(self, index: int) -> list[str]:
        index = check_index(index, len(self))
        return self._captions[index]

    def describe(self, index: int) -> str:
        return self._images[check_index(index, len(self))]


def open_manifest(
    path: str | os.PathLike, image_column: str = "image", caption_column: str = "caption", label_column: str = "label"
) -> ManifestSource:
    """``data.kind: manifest``: the manifest ``path`` read by the columns its data section names."""
    return ManifestSource(path, ManifestColumns(image_column, caption_column, label_column))
