"""Hugging Face ``datasets`` data on disk (``hf``): a ``save_to_disk`` folder, or Parquet / Arrow files.

Rows stay in the Arrow table (memory-mapped where the format allows), never in Python lists, so forked
loader workers share them. Needs ``pyarrow`` (and ``datasets`` for ``save_to_disk`` folders):
``pip install 'clipforge[hf]'``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.base import DataError, ImageLoadError, bounded_text, check_index, decode_image
from clipforge.data.files import classnames_for

logger = logging.getLogger("clipforge")

HF_EXPECTED = "a datasets folder written by save_to_disk, a .parquet/.arrow file, a folder of them, or a glob"
_SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
_TABLE_SUFFIXES = (".parquet", ".arrow")
_SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test", "restval")


def _require(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(
            f"data.kind='hf' needs the {module.split('.')[0]!r} package: pip install 'clipforge[hf]'"
        ) from None


class HFSource:
    """Rows of an Arrow table: an image column and a caption column (string or list of strings) and/or a
    label column (integers, a ``ClassLabel``, or strings).

    * image cells: the ``datasets.Image`` struct ``{bytes, path}``, raw bytes, or a path string (relative
      paths are read under ``image_root``, else the dataset's folder);
    * with a caption column, rows whose caption is null or empty are left out (``skipped_rows``);
      without one, the class name is the caption (a classification set);
    * ``classnames``: from ``data.classnames``, else the ``ClassLabel`` names, else the sorted distinct
      string labels, else ``"0".."K-1"`` for a label-only set (None for captioned sets with integer labels).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "caption",
        label_column: str = "label",
        image_root: str = "",
        classnames: str = "",
    ) -> None:
        pa = _require("pyarrow")
        pc = _require("pyarrow.compute")
        self.path = Path(path)
        table, features, folder = _open_table(self.path, split)
        columns = table.column_names
        if image_column not in columns:
            raise DataError(
                f"data.kind='hf': {self.path} has no image column {image_column!r}; columns found: {columns}; "
                "set data.image_column"
            )
        has_captions, has_labels = caption_column in columns, label_column in columns
        if not has_captions and not has_labels:
            raise DataError(
                f"data.kind='hf': {self.path} has neither the caption column {caption_column!r} nor the label "
                f"column {label_column!r}; columns found: {columns}; set data.caption_column or data.label_column"
            )
        self.root = Path(image_root) if image_root else folder
        self._image_kind = _image_kind(table.schema.field(image_column).type, pa, self.path)
        keep = (
            _rows_with_a_caption(table.column(caption_column), caption_column, self.path, pa, pc)
            if has_captions
            else np.ones(table.num_rows, dtype=bool)
        )
        self.rows = np.flatnonzero(keep)  # (num_images,) table row of each image
        self.skipped_rows = int(table.num_rows - len(self.rows))
        if len(self.rows) == 0:
            raise DataError(f"data.kind='hf': {self.path}: none of its {table.num_rows} rows has a caption")
        if self.skipped_rows:
            _report_skipped_rows(self.path, keep)
        self._table = table
        self._image_column = table.column(image_column)
        self._caption_column = table.column(caption_column) if has_captions else None
        self.labels: np.ndarray | None = None
        self.classnames: list[str] | None = None
        if has_labels:
            self._read_labels(table.column(label_column), features.get(label_column, {}), classnames, has_captions, pa)

    def _read_labels(self, column: Any, feature: dict, classnames: str, has_captions: bool, pa: Any) -> None:
        values = column.to_numpy(zero_copy_only=False)[self.rows]
        if pa.types.is_integer(column.type):
            labels = values.astype(np.int64)
            names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
            count = len(names) if names else int(labels.max()) + 1
            default = names or ([str(i) for i in range(count)] if not has_captions or classnames else None)
        else:
            default = sorted({str(value) for value in values})
            number = {name: i for i, name in enumerate(default)}
            labels = np.asarray([number[str(value)] for value in values], dtype=np.int64)
            count = len(default)
        self.labels = labels
        self.classnames = classnames_for(classnames, "hf", count, default) if default is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, index: int) -> Image.Image:
        cell = self._image_column[int(self.rows[check_index(index, len(self))])].as_py()
        if self._image_kind == "struct" and cell is not None:
            # a datasets Image cell: embedded bytes, or a path when the images stayed outside the table
            cell = cell.get("bytes") or (self.root / cell["path"] if cell.get("path") else None)
        elif self._image_kind == "path" and cell:
            cell = self.root / cell
        if not cell:
            raise ImageLoadError(f"{self.describe(index)}: the image cell is empty")
        return decode_image(cell)

    def captions(self, index: int) -> list[str]:
        row = int(self.rows[check_index(index, len(self))])
        if self._caption_column is None:
            return [self.classnames[self.labels[index]]]
        value = self._caption_column[row].as_py()
        texts = [value] if isinstance(value, str) else [text for text in value if text and text.strip()]
        return [bounded_text(text.strip()) for text in texts] or [bounded_text(str(value))]

    def describe(self, index: int) -> str:
        return f"{self.path} row {int(self.rows[check_index(index, len(self))])}"


def _rows_with_a_caption(column: Any, name: str, path: Path, pa: Any, pc: Any) -> np.ndarray:
    """(num_rows,) bool: the rows whose caption cell is a non-blank string or a non-empty list."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        valid = pc.greater(pc.list_value_length(column), 0)
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        valid = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    else:
        raise DataError(
            f"data.kind='hf': {path}: caption column {name!r} holds {column.type}; expected strings or lists of strings"
        )
    return np.asarray(pc.fill_null(valid, False).to_numpy(zero_copy_only=False), dtype=bool)


def _report_skipped_rows(path: Path, keep: np.ndarray, shown: int = 5) -> None:
    """One warning for the rows left out for an empty caption: how many, and the first few row numbers."""
    dropped = np.flatnonzero(~keep)
    logger.warning(
        "data.kind='hf': %s: skipped %d of %d rows with an empty caption (rows %s%s)",
        path,
        len(dropped),
        len(keep),
        ", ".join(str(row) for row in dropped[:shown].tolist()),
        ", ..." if len(dropped) > shown else "",
    )


def _image_kind(kind: Any, pa: Any, path: Path) -> str:
    if pa.types.is_struct(kind) and {"bytes", "path"} & {kind.field(i).name for i in range(kind.num_fields)}:
        return "struct"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    raise DataError(
        f"data.kind='hf': {path}: the image column holds {kind}; expected a datasets Image feature "
        "(struct of bytes and path), encoded image bytes, or image paths"
    )


# ----------------------------------------------------------------------------------------------
# Opening the table
# ----------------------------------------------------------------------------------------------
def _open_table(path: Path, split: str) -> tuple[Any, dict[str, dict], Path]:
    """(pyarrow Table, features as plain dicts, folder that relative image paths start from)."""
    if path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
        return _open_saved(path, split)
    files = _table_files(path, split)
    pa = _require("pyarrow")
    tables = [_read_file(file, pa) for file in files]
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as error:
        raise DataError(f"data.kind='hf': the files of {path} have different columns ({error})") from None
    metadata = (tables[0].schema.metadata or {}).get(b"huggingface")
    features = json.loads(metadata).get("info", {}).get("features", {}) if metadata else {}
    return table, features, files[0].parent


def _open_saved(path: Path, split: str) -> tuple[Any, dict[str, dict], Path]:
    datasets = _require("datasets")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"data.kind='hf': {path} has no split {split!r}; the splits present are {sorted(loaded)}; set data.split"
            )
        loaded = loaded[split]
    # save_to_disk flattens any indices mapping, so the memory-mapped table holds exactly the rows
    features = {
        name: {"_type": "ClassLabel", "names": list(feature.names)}
        for name, feature in loaded.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    return loaded.data.table, features, path


def _table_files(path: Path, split: str) -> list[Path]:
    """The Parquet/Arrow files of ``split`` that ``path`` (a file, a folder or a glob) names."""
    if any(char in str(path) for char in "*?["):
        anchor = Path(path.anchor) if path.is_absolute() else Path(".")
        files = sorted(anchor.glob(str(path.relative_to(anchor)) if path.is_absolute() else str(path)))
    elif path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TABLE_SUFFIXES and p.is_file())
        files = _files_of_split(files, path, split)
    else:
        raise FileNotFoundError(f"data.kind='hf': {str(path)!r} does not exist; expected {HF_EXPECTED}")
    files = [file for file in files if file.suffix in _TABLE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"data.kind='hf': no .parquet or .arrow file at {str(path)!r}; expected {HF_EXPECTED}")
    return files


def _split_of(file: Path, root: Path) -> str | None:
    """The split a file belongs to by the Hub's layouts: ``train-00000-of-00004.parquet`` or ``train/x.parquet``."""
    for part in file.relative_to(root).parts:
        for name in _SPLIT_NAMES:
            if part == name or part.startswith((f"{name}-", f"{name}_", f"{name}.")):
                return name
    return None


def _files_of_split(files: list[Path], root: Path, split: str) -> list[Path]:
    splits = {file: _split_of(file, root) for file in files}
    present = sorted({name for name in splits.values() if name is not None})
    if not present:
        return files  # one unsplit table: ``split`` does not apply
    chosen = [file for file in files if splits[file] == split]
    if not chosen:
        raise DataError(
            f"data.kind='hf': {root} has no files of split {split!r}; the splits present are {present}; set data.split"
        )
    return chosen


def _read_file(file: Path, pa: Any) -> Any:
    if file.suffix == ".parquet":
        parquet = _require("pyarrow.parquet")
        try:
            return parquet.read_table(file, memory_map=True)
        except pa.ArrowInvalid as error:
            raise DataError(f"data.kind='hf': {file} is not a readable Parquet file ({error})") from None
    source = pa.memory_map(str(file))
    # datasets writes Arrow *stream* files; the IPC *file* format (with a footer) is the other flavour
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            source.seek(0)
            return opener(source).read_all()
        except pa.ArrowInvalid:
            continue
    raise DataError(f"data.kind='hf': {file} is neither an Arrow stream nor an Arrow file; expected {HF_EXPECTED}")
