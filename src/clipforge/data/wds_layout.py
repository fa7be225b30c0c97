"""Where the shards of a ``webdataset`` data section are, and what lies beside them.

``data.path`` names the shards in one of three ways:

- a shard spec: one ``.tar`` file, brace notation (``data/{00000..00123}.tar``) or several specs joined by ``::``;
- a folder holding ``.tar`` shards (read in natural order: ``2.tar`` before ``10.tar``);
- CLIP_benchmark's ``wds_<name>/`` folder, read as its ``test/`` split (CLIP_benchmark's default split); name a
  split's own folder (``wds_<name>/train``) for another::

      wds_cifar10/
          test/0.tar 1.tar ...  (nshards.txt: how many; .webp/.png/.jpg + .cls, or + .txt for retrieval)
          train/...
          classnames.txt                          one class name a line, in label order
          zeroshot_classification_templates.txt   one prompt template a line, with {c}
          dataset_type.txt                        "retrieval": every line of a .txt member is a caption

The three files are looked for in the folder of the shards and the folder above it, so a ``wds_<name>/test``
path works too. Nothing here opens a tar file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from clipforge.data.base import DataError
from clipforge.data.files import read_text

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
DEFAULT_SPLIT = "test"  # CLIP_benchmark's --split default


@dataclass(frozen=True)
class ShardLayout:
    """The shard files, in reading order, and what their folder says about them.

    ``classnames``/``templates``: the lines of ``classnames.txt`` / ``zeroshot_classification_templates.txt``
    (None without the file). ``caption_lines``: each line of a ``.txt`` member is a caption of its own
    (CLIP_benchmark's retrieval sets, ``dataset_type.txt`` = ``retrieval``).
    """

    shards: list[str] | None  # None: the spec is expanded by the shard reader (brace notation)
    classnames: list[str] | None = None
    templates: list[str] | None = None
    caption_lines: bool = False


def resolve_layout(path: str) -> ShardLayout:
    """The :class:`ShardLayout` of ``data.path`` = ``path`` (module docstring).

    Raises ``FileNotFoundError`` naming what is missing: a folder with neither shards nor a ``test/`` sub-folder
    (listing the sub-folders it has, e.g. the splits of a ``wds_<name>/`` folder).
    """
    folder = Path(path)
    if not folder.is_dir():
        return ShardLayout(None)
    split_folder = folder / DEFAULT_SPLIT
    if split_folder.is_dir() and not _has_shards(folder):
        shards_folder, metadata = split_folder, [folder, split_folder]
    else:
        shards_folder, metadata = folder, [folder, folder.parent]
    shards = _shard_files(shards_folder)
    if not shards:
        raise FileNotFoundError(
            f"data.kind='webdataset': {shards_folder} holds no .tar shard (its sub-folders: "
            f"{_subfolders(shards_folder)}); expected shards, or CLIP_benchmark's wds_<name>/ folder with a "
            f"{DEFAULT_SPLIT}/ sub-folder (name wds_<name>/<split> for another split)"
        )
    dataset_type = _first_file(metadata, DATASET_TYPE_FILE)
    return ShardLayout(
        shards=shards,
        classnames=_read_lines(_first_file(metadata, CLASSNAMES_FILE)),
        templates=_read_lines(_first_file(metadata, TEMPLATES_FILE)),
        caption_lines=dataset_type is not None and (_read_lines(dataset_type) or [""])[0].lower() == "retrieval",
    )


def _natural_key(name: str) -> list:
    """``"10.tar"`` after ``"2.tar"``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _shard_files(folder: Path) -> list[str]:
    """The shards of ``folder``: ``0.tar .. n-1.tar`` when ``nshards.txt`` says n (CLIP_benchmark), else every
    ``.tar`` file in natural order."""
    count_file = folder / NSHARDS_FILE
    if count_file.is_file():
        text = read_text(count_file, f"data.kind='webdataset': {count_file}").strip()
        if not text.isdigit():
            raise DataError(f"data.kind='webdataset': {count_file} holds {text[:40]!r}; expected the number of shards")
        return [str(folder / f"{number}.tar") for number in range(int(text))]
    names = sorted((entry.name for entry in os.scandir(folder) if entry.name.endswith(".tar")), key=_natural_key)
    return [str(folder / name) for name in names]


def _has_shards(folder: Path) -> bool:
    return (folder / NSHARDS_FILE).is_file() or any(entry.name.endswith(".tar") for entry in os.scandir(folder))


def _first_file(folders: list[Path], name: str) -> Path | None:
    return next((folder / name for folder in folders if (folder / name).is_file()), None)


def _read_lines(path: Path | None) -> list[str] | None:
    """The stripped lines of a small text file, trailing blank lines dropped (CLIP_benchmark reads them so)."""
    if path is None:
        return None
    lines = [line.strip() for line in read_text(path, f"data.kind='webdataset': {path}").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _subfolders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())[:20]
