"""Captioned image sets: MS-COCO captions (``coco``) and Flickr8k/30k in their three formats (``flickr``).

All formats end up in one :class:`CaptionedImageSource`: image paths relative to an image folder, and
every image's captions (usually 5) in fork-friendly tables. Training picks one caption per visit (the
loader's ``caption_sampling``); evaluation reads all of them through ``captions(index)``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.config import UNLABELLED
from clipforge.data.base import DataError, bounded_text, check_index, decode_image
from clipforge.data.files import (
    MAX_LINE_CHARS,
    bounded_lines,
    check_images_present,
    not_utf8,
    read_json,
    read_text,
    require_file,
    resolve_image_root,
)
from clipforge.data.tables import CaptionTable, StringTable
from clipforge.io import shown

logger = logging.getLogger("clipforge")


class CaptionedImageSource:
    """Image files under ``root`` with several captions each; no labels.

    ``image_paths[i]`` is relative to ``root``; ``caption_groups[i]`` holds image ``i``'s captions (at
    least one). ``origin`` is the annotation file, named in error messages. At start, a few images spread
    over the list are looked for, so a wrong ``image_root`` fails now rather than as all-skipped samples.
    """

    labels: np.ndarray | None = None
    classnames: list[str] | None = None
    capabilities = UNLABELLED  # captions only: no class labels
    images_without_captions: int = 0  # COCO images listed with no caption: left out
    orphan_captions: int = 0  # COCO captions of an image id that 'images' does not list: left out

    def __init__(
        self,
        root: Path,
        image_paths: Sequence[str],
        caption_groups: Sequence[Sequence[str]],
        origin: Path,
        kind: str,
    ) -> None:
        if len(image_paths) != len(caption_groups):
            raise DataError(f"{len(image_paths)} image paths but {len(caption_groups)} caption groups")
        if not image_paths:
            raise DataError(f"data.kind={kind!r}: {origin} lists no image with a caption")
        self.root = Path(root)
        self.origin = Path(origin)
        self._images = StringTable(image_paths)
        self._captions = CaptionTable(caption_groups)
        self.caption_offsets = self._captions.offsets
        check_images_present(self.root, self._images, self.origin, kind)

    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_captions(self) -> int:
        return self._captions.num_captions

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self.root / self._images[check_index(index, len(self))])

    def captions(self, index: int) -> list[str]:
        return self._captions[check_index(index, len(self))]

    def describe(self, index: int) -> str:
        return str(self.root / self._images[check_index(index, len(self))])


# ----------------------------------------------------------------------------------------------
# MS-COCO captions_*.json
# ----------------------------------------------------------------------------------------------
COCO_EXPECTED = "an MS-COCO captions file (captions_train2017.json: 'images' + 'annotations' with 'caption')"


def read_coco(path: str | os.PathLike, image_root: str = "") -> CaptionedImageSource:
    """An MS-COCO captions file (``images``: id, file_name; ``annotations``: image_id, caption).

    Images keep the order of ``images``; an image without any caption is left out (counted in
    ``images_without_captions``), a caption of an unknown image id is counted in ``orphan_captions``.
    ``image_root`` empty: the sibling folder named after the file (``annotations/captions_train2017.json``
    -> ``train2017/`` next to ``annotations/``), else the file's own folder.
    """
    path = require_file(path, "coco", COCO_EXPECTED)
    data = read_json(path, "coco", COCO_EXPECTED)
    _check_coco_layout(data, path)
    position: dict[object, int] = {}
    file_names: list[str] = []
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DataError(f"data.kind='coco': {path}: an 'images' entry lacks 'id' or 'file_name': {shown(entry)}")
        position[entry["id"]] = len(file_names)
        file_names.append(str(entry["file_name"]))
    groups: list[list[str]] = [[] for _ in file_names]
    orphans = 0
    for annotation in data["annotations"]:
        if not isinstance(annotation, dict):
            raise DataError(f"data.kind='coco': {path}: an 'annotations' entry is not an object: {shown(annotation)}")
        index = position.get(annotation.get("image_id"))
        caption = bounded_text(str(annotation.get("caption") or "").strip())
        if index is None:
            orphans += 1
        elif caption:
            groups[index].append(caption)
    kept = [i for i, group in enumerate(groups) if group]
    split_folder = path.stem.removeprefix("captions_")  # captions_train2017 -> train2017
    root = resolve_image_root(
        image_root, [path.parent.parent / split_folder, path.parent / split_folder, path.parent], "coco"
    )
    source = CaptionedImageSource(root, [file_names[i] for i in kept], [groups[i] for i in kept], path, "coco")
    source.images_without_captions = len(file_names) - len(kept)
    source.orphan_captions = orphans
    if source.images_without_captions or orphans:
        logger.warning(
            "coco %s: left out %d images without a caption and %d captions of image ids that 'images' does not list",
            path,
            source.images_without_captions,
            orphans,
        )
    return source


def _check_coco_layout(data: object, path: Path) -> None:
    """The top-level keys first (a Karpathy file is the usual mix-up), then the first annotation's keys."""
    if not isinstance(data, dict):
        raise DataError(f"data.kind='coco': {path} holds a JSON {type(data).__name__}; expected {COCO_EXPECTED}")
    if "annotations" not in data and ("dataset" in data or _is_karpathy(data)):
        raise DataError(
            f"data.kind='coco': {path} is a Karpathy split file (top-level keys {sorted(data)}: 'images' with "
            f"'sentences' and 'split'), not {COCO_EXPECTED}; use data.kind='flickr', which reads dataset_coco.json "
            "and dataset_flickr*.json"
        )
    missing = [key for key in ("images", "annotations") if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(
            f"data.kind='coco': {path} has no list {missing} (found keys {sorted(data)}); expected {COCO_EXPECTED}"
        )
    first = next(iter(data["annotations"]), None)
    if isinstance(first, dict) and "caption" not in first:
        found = sorted(first)
        hint = " (an instances/keypoints file)" if {"bbox", "segmentation", "keypoints"} & set(found) else ""
        raise DataError(
            f"data.kind='coco': {path} has annotations without 'caption'{hint}, with keys {found}; "
            f"expected {COCO_EXPECTED}, e.g. annotations/captions_train2017.json"
        )


def _is_karpathy(data: dict) -> bool:
    first = next(iter(data.get("images") or []), None)
    return isinstance(first, dict) and "sentences" in first


# ----------------------------------------------------------------------------------------------
# Flickr8k / Flickr30k (and Karpathy's dataset_coco.json)
# ----------------------------------------------------------------------------------------------
FLICKR_EXPECTED = (
    "a Karpathy split JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json), "
    "a Flickr8k.token.txt file (image#n<TAB>caption) or a captions.txt CSV (header image,caption)"
)
# the folders the images come in, next to the caption files: the official Flickr8k zip (with its typo),
# the Flickr30k archive, and the Kaggle copies of both
FLICKR_IMAGE_FOLDERS = (
    "Flicker8k_Dataset",
    "Flickr8k_Dataset",
    "flickr30k-images",
    "flickr30k_images",
    "Images",
    "images",
)
# Flickr_8k.trainImages.txt etc.: the official Flickr8k split lists; the "dev" list is the val split
SPLIT_LIST_NAMES = {"train": "train", "val": "dev", "test": "test"}


def read_flickr(path: str | os.PathLike, image_root: str = "", split: str = "train") -> CaptionedImageSource:
    """Flickr8k/30k captions in any of their formats, ``split`` selected.

    * Karpathy JSON: ``images[*]`` with ``filename`` (and ``filepath`` for COCO), ``split`` (train, val,
      test, restval) and ``sentences[*].raw``. ``split`` may join names with ``+`` (``train+restval``, the
      usual COCO training set) or be ``all``.
    * ``Flickr8k.token.txt`` (``image#n<TAB>caption``) or ``captions.txt`` (CSV ``image,caption``): these
      carry no split; ``train``/``val``/``test`` come from the official ``Flickr_8k.trainImages.txt`` /
      ``devImages`` / ``testImages`` lists when they lie beside the file, else only ``all`` exists.

    ``image_root`` empty: the usual image folder next to the file (``Flicker8k_Dataset``,
    ``flickr30k-images``, ``Images``, ...), else the file's own folder.
    """
    path = require_file(path, "flickr", FLICKR_EXPECTED)
    if path.suffix.lower() == ".json":
        names, groups, split_of = _read_karpathy(path)
    else:
        names, groups = _read_caption_lines(path)
        split_of = _split_lists(path, names)
    wanted = _wanted_splits(split, split_of, path)
    kept = [i for i in range(len(names)) if wanted is None or split_of[i] in wanted]
    candidates = [path.parent / folder for folder in FLICKR_IMAGE_FOLDERS] + [path.parent]
    root = resolve_image_root(image_root, candidates, "flickr")
    return CaptionedImageSource(root, [names[i] for i in kept], [groups[i] for i in kept], path, "flickr")


def _wanted_splits(split: str, split_of: Sequence[str | None] | None, path: Path) -> set[str] | None:
    """The split names ``split`` asks for (None = all), checked against those present."""
    if split == "all":
        return None
    wanted = {part.strip() for part in split.split("+") if part.strip()}
    if split_of is None:
        raise DataError(
            f"data.kind='flickr': {path} carries no split, so the only split present is ['all']; set "
            f"data.split=all, or put the Flickr8k split lists (Flickr_8k.trainImages.txt, ...devImages.txt, "
            f"...testImages.txt) beside it"
        )
    present = sorted({name for name in split_of if name is not None})
    if wanted - set(present):
        raise DataError(
            f"data.kind='flickr': {path} has no image in split {sorted(wanted - set(present))}; the splits present are "
            f"{present + ['all']} (join several with '+', e.g. train+restval)"
        )
    return wanted


def _read_karpathy(path: Path) -> tuple[list[str], list[list[str]], list[str | None]]:
    data = read_json(path, "flickr", FLICKR_EXPECTED)
    if isinstance(data, dict) and "annotations" in data and not _is_karpathy(data):
        raise DataError(
            f"data.kind='flickr': {path} is an MS-COCO captions file ('images' + 'annotations'), not a Karpathy "
            f"split file; use data.kind='coco' for it"
        )
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not _is_karpathy(data):
        found = sorted(data) if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise DataError(
            f"data.kind='flickr': {path} is not a Karpathy split file (found {found}); expected an object whose "
            f"'images' entries have 'filename', 'split' and 'sentences' (dataset_flickr8k.json and its kin)"
        )
    names, groups, splits = [], [], []
    without_sentence = 0
    for entry in data["images"]:
        if not isinstance(entry, dict) or "filename" not in entry:
            raise DataError(f"data.kind='flickr': {path}: an image entry has no 'filename': {shown(entry)}")
        captions = [_sentence_text(sentence) for sentence in entry.get("sentences", [])]
        captions = [text for text in captions if text]
        if not captions:
            without_sentence += 1  # an image without a usable sentence cannot be a training or retrieval sample
            continue
        folder = entry.get("filepath")  # dataset_coco.json: train2014 / val2014
        names.append(f"{folder}/{entry['filename']}" if folder else str(entry["filename"]))
        groups.append(captions)
        splits.append(entry.get("split"))
    if without_sentence:
        logger.warning("flickr %s: left out %d images without a sentence", path, without_sentence)
    return names, groups, splits


def _sentence_text(sentence: object) -> str:
    if isinstance(sentence, dict):
        raw = sentence.get("raw") or " ".join(sentence.get("tokens") or [])
        return bounded_text(str(raw).strip())
    return bounded_text(str(sentence).strip())


def _read_caption_lines(path: Path) -> tuple[list[str], list[list[str]]]:
    """``image#n<TAB>caption`` lines or an ``image,caption`` CSV; captions grouped by image, first-seen order."""
    try:
        return _group_caption_lines(path)
    except UnicodeDecodeError:
        raise not_utf8(path, f"data.kind='flickr': {path}") from None


def _group_caption_lines(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        first = handle.readline(MAX_LINE_CHARS)
        handle.seek(0)
        lines = bounded_lines(handle, f"data.kind='flickr': {path}")
        if "\t" in first:
            pairs = _token_lines(lines, path)
        elif [cell.strip().lower() for cell in next(csv.reader([first]), [])][:2] == ["image", "caption"]:
            reader = csv.reader(lines)
            next(reader)
            pairs = ((row[0], row[1]) for row in reader if len(row) >= 2)
        else:
            raise DataError(
                f"data.kind='flickr': {path} starts with {first.strip()[:60]!r}; expected {FLICKR_EXPECTED}"
            )
        position: dict[str, int] = {}
        groups: list[list[str]] = []
        empty = 0
        for image, caption in pairs:
            image, caption = image.strip(), bounded_text(caption.strip())
            if not image or not caption:
                empty += 1
                continue
            if image not in position:
                position[image] = len(groups)
                groups.append([])
            groups[position[image]].append(caption)
    if not groups:
        raise DataError(f"data.kind='flickr': {path} holds no caption; expected {FLICKR_EXPECTED}")
    if empty:
        logger.warning("flickr %s: skipped %d lines with an empty caption or image name", path, empty)
    return list(position), groups


def _token_lines(lines: Iterable[str], path: Path) -> Iterable[tuple[str, str]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, tab, caption = line.rstrip("\r\n").partition("\t")
        if not tab:
            raise DataError(
                f"data.kind='flickr': {path}, line {number}: no tab; expected 'image.jpg#n<TAB>caption' lines"
            )
        yield key.rsplit("#", 1)[0] if "#" in key else key, caption


def _split_lists(path: Path, names: Sequence[str]) -> list[str | None] | None:
    """Each image's split from the Flickr8k split lists beside ``path``; None when there are none."""
    split_of: list[str | None] = [None] * len(names)
    position = {name: i for i, name in enumerate(names)}
    found = False
    for split, list_name in SPLIT_LIST_NAMES.items():
        for list_file in sorted(path.parent.glob(f"*.{list_name}Images.txt")):
            found = True
            for line in read_text(list_file, f"data.kind='flickr': split list {list_file}").splitlines():
                index = position.get(line.strip())
                if index is not None:
                    split_of[index] = split
    return split_of if found else None
