"""CSV / TSV / JSONL manifests: image paths with one or more captions (and optionally a label) each."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.base import check_index, decode_image
from clipforge.data.tables import CaptionTable, StringTable

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
        return decode_image(self._images[check_index(index, len(self))])

    def captions(self, index: int) -> list[str]:
        index = check_index(index, len(self))
        return self._captions[index]

    def describe(self, index: int) -> str:
        return self._images[check_index(index, len(self))]
