"""What ``clipforge embed`` reads: an image folder, a manifest, a data config or WebDataset shards; caption files.

Every input becomes a map-style source (``len``, ``load_image``, ``describe``), so the embedding loop is the
evaluation one (``encode_source_images``). ``describe(i)`` is the image's id in an embedding store: its
absolute path for files, ``shard.tar:key`` for shards, the source's own description otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.base import (
    DataError,
    ImageLoadError,
    ImageTextSource,
    StreamingSource,
    bounded_text,
    capabilities_of,
    decode_image,
)
from clipforge.data.classification import IMAGE_EXTENSIONS, ImageFolderSource
from clipforge.data.files import bounded_lines, not_utf8
from clipforge.data.manifest import ManifestSource
from clipforge.data.sources import build_source
from clipforge.data.tables import StringTable

CONFIG_SUFFIXES = (".yaml", ".yml")
SHARD_SUFFIX = ".tar"


class ImageFilesSource:
    """Every image file under ``root`` (recursively, sorted, by extension), or an explicit list of files.

    There are no captions or labels: ``captions(i)`` is the file's stem only because the loader's protocol
    asks for one. Files that fail to decode raise ``ImageLoadError`` in ``load_image`` (reported, not fatal).
    """

    labels: np.ndarray | None = None
    classnames: list[str] | None = None

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        if not paths:
            raise DataError("no image files given")
        # absolute and normalized: the path is the image's id in an embedding store, the same from any cwd
        self._paths = StringTable([os.path.abspath(path) for path in paths])

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> ImageFilesSource:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        paths = []
        for directory, subfolders, names in os.walk(root):
            subfolders.sort()
            paths.extend(os.path.join(directory, name) for name in sorted(names) if _is_image_name(name))
        if not paths:
            raise DataError(f"{root} holds no image files (looked recursively for {list(IMAGE_EXTENSIONS)})")
        return cls(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self._paths[index])

    def captions(self, index: int) -> list[str]:
        return [Path(self._paths[index]).stem]

    def describe(self, index: int) -> str:
        return self._paths[index]


class ShardImageSource:
    """The images of WebDataset shards as a map-style source: one header scan, then reads by position.

    ``shards``: a shard spec, or the streamed source of a ``webdataset`` data config. ``describe(i)`` is
    ``shard.tar:key``. Samples without an image are skipped at the scan.
    """

    labels: np.ndarray | None = None
    classnames: list[str] | None = None

    def __init__(self, shards: str | StreamingSource) -> None:
        from clipforge.data.shards import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS
        from clipforge.data.shards import ShardSource

        spec = shards if isinstance(shards, str) else repr(shards)
        self.shards = ShardSource(shards) if isinstance(shards, str) else shards
        self._refs = [
            ref
            for shard in range(len(self.shards.shards))
            for ref in self.shards.scan(shard)
            if any(extension in SHARD_IMAGE_EXTENSIONS for extension, _, _ in ref.members)
        ]
        if not self._refs:
            raise DataError(f"the shards {spec!r} hold no sample with an image")

    def __len__(self) -> int:
        return len(self._refs)

    def load_image(self, index: int) -> Image.Image:
        sample = self.shards.read(self._refs[index])
        if sample.image is None:
            raise ImageLoadError(f"{sample.where}: {sample.problem or 'no image'}")
        return decode_image(sample.image)

    def captions(self, index: int) -> list[str]:
        return [self._refs[index].key]

    def describe(self, index: int) -> str:
        ref = self._refs[index]
        return f"{os.path.abspath(self.shards.shards[ref.shard])}:{ref.key}"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_shard_spec(spec: str) -> bool:
    return spec.endswith(SHARD_SUFFIX) or ("{" in spec and ".tar" in spec) or "::" in spec


def resolve_image_spec(spec: str | os.PathLike) -> str:
    """``spec`` in the form stored beside embeddings: absolute for a path, as given for a recipe name."""
    spec = str(spec)
    if os.path.exists(spec) or (_is_shard_spec(spec) and not spec.startswith("/")):
        return os.path.abspath(spec)
    return spec


def open_image_source(spec: str | os.PathLike) -> ImageTextSource:
    """The images ``spec`` names.

    - a folder: every image file below it (recursively);
    - a ``.csv``/``.tsv``/``.jsonl`` manifest (``image`` column, paths relative to the manifest);
    - a ``.yaml`` data config (its ``data`` section, any ``data.kind``) or a shipped recipe name (``demo``);
    - WebDataset shards: ``shards/{00000..00009}.tar`` or one ``.tar`` file.
    """
    from clipforge.config import ConfigError, load_config, resolve_config_path

    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        return ImageFilesSource.from_folder(path)
    if _is_shard_spec(spec):
        return ShardImageSource(spec)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".tab", ".jsonl"):
        return ManifestSource(path.resolve())
    if path.is_file() and _is_image_name(path.name):
        return ImageFilesSource([path])
    try:
        config_path = resolve_config_path(spec)
    except ConfigError:
        raise FileNotFoundError(
            f"--images {spec!r} is not an image folder, a manifest (.csv/.tsv/.jsonl), a data config (.yaml), a "
            f"recipe name, or WebDataset shards (.tar)"
        ) from None
    source = build_source(load_config(config_path).data)
    # a streamed source (shards) has no index: one scan of its shards' headers gives it one
    return source if capabilities_of(source).random_access else ShardImageSource(source)


def source_names_files(source: ImageTextSource) -> bool:
    """True when ``describe(i)`` is the path of image i's file (the web page can then serve it directly)."""
    return isinstance(source, ImageFilesSource | ManifestSource | ImageFolderSource)


def read_texts(path: str | os.PathLike) -> list[str]:
    """Captions to embed from a text file, one per line (blank lines skipped, surrounding space stripped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--texts {str(path)!r} does not exist; expected a text file with one caption a line")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # line by line: each line bounded, each caption cut
            texts = [bounded_text(line.strip()) for line in bounded_lines(handle, f"--texts {path}") if line.strip()]
    except UnicodeDecodeError:
        raise not_utf8(path, f"--texts {path}") from None
    if not texts:
        raise DataError(f"--texts {path} holds no caption (one caption a line)")
    return texts
