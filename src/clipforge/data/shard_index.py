"""WebDataset shards as a map-style source: an index from one scan of their headers, samples read by position.

Evaluation must visit every image exactly once and look its captions and label up by index
(``SourceCapabilities.evaluable``); a tar has no index of its samples, so :class:`IndexedShards` makes one: a scan
of each shard's member headers (``ShardSource.scan``: 512 bytes a member, the data is seeked over) gives where
every sample's image, caption and label members lie. The index is kept in NumPy arrays, ~90 bytes a sample (a
million samples: ~90 MB, no Python object per sample), and a sample's bytes are read (``os.pread``) only when it
is used, in index order, which is file order: an evaluation reads each shard front to back, one sample at a time,
and never holds more than a loader batch of images.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from clipforge.config import MAP_STYLE
from clipforge.data.base import DataError, ImageLoadError, check_index, decode_image
from clipforge.data.shards import IMAGE_EXTENSIONS, SampleRef, ShardSample, ShardSource
from clipforge.data.tables import StringTable

# the members the index keeps, one column each: the first image of a sample, and its text, metadata and label
_COLUMNS = ("image", "txt", "json", "cls")


class IndexedShards:
    """Every sample of ``shards`` (a :class:`ShardSource`), in shard and file order, by index.

    ``load_image(i)`` decodes sample i's image (``ImageLoadError`` when it has none or it is broken: evaluation
    skips and counts it); ``captions(i)`` its captions (the ``.txt`` member, each line one caption in
    CLIP_benchmark's retrieval shards, or the ``.json`` ``caption``/``captions``), or its class name when it has
    only a label; ``describe(i)`` is ``shard.tar:key``. ``labels`` (read once, on first use: each sample's ``.cls``
    or ``.json`` member) and ``classnames`` (``classnames.txt`` beside the shards, else the ``classname`` the
    samples' ``.json`` give) are None for shards without labels. ``templates``: the prompt templates beside the
    shards (CLIP_benchmark's ``zeroshot_classification_templates.txt``), or None.
    """

    capabilities = MAP_STYLE

    def __init__(self, shards: ShardSource) -> None:
        self.shards = shards
        self.templates = shards.templates
        keys: list[str] = []
        shard_numbers: list[np.ndarray] = []
        offsets: list[np.ndarray] = []  # per shard: (samples, 4) data offsets of the _COLUMNS members, -1 if absent
        sizes: list[np.ndarray] = []
        extensions: list[str] = []  # the image member's extension of each sample ("" without one)
        for shard in range(len(shards.shards)):
            refs = shards.scan(shard)
            shard_offsets = np.full((len(refs), len(_COLUMNS)), -1, dtype=np.int64)
            shard_sizes = np.zeros((len(refs), len(_COLUMNS)), dtype=np.int64)
            for row, ref in enumerate(refs):
                keys.append(ref.key)
                extensions.append(_fill_row(ref, shard_offsets[row], shard_sizes[row]))
            shard_numbers.append(np.full(len(refs), shard, dtype=np.int32))
            offsets.append(shard_offsets)
            sizes.append(shard_sizes)
        if not keys:
            raise shards.no_sample_error()
        self._keys = StringTable(keys)
        self._shard = np.concatenate(shard_numbers)
        self._offsets = np.concatenate(offsets)
        self._sizes = np.concatenate(sizes)
        names = sorted(set(extensions))
        self._extension_names = names
        self._extension = np.asarray([names.index(extension) for extension in extensions], dtype=np.int8)
        self._labels: np.ndarray | None = None
        self._classnames: list[str] | None = shards.classnames
        self._labels_read = False

    def __repr__(self) -> str:
        return f"IndexedShards({self.shards!r}, {len(self)} samples)"

    def __len__(self) -> int:
        return len(self._keys)

    # -- reading one sample ----------------------------------------------------------------------
    def ref(self, index: int) -> SampleRef:
        """Where sample ``index`` lies (what ``ShardSource.read`` takes)."""
        index = check_index(index, len(self))
        members = []
        for column, name in enumerate(_COLUMNS):
            offset = int(self._offsets[index, column])
            if offset >= 0:
                extension = self._extension_names[self._extension[index]] if name == "image" else name
                members.append((extension, offset, int(self._sizes[index, column])))
        return SampleRef(int(self._shard[index]), index, self._keys[index], tuple(members))

    def sample(self, index: int, image: bool = True) -> ShardSample:
        """Sample ``index``'s contents (``image=False``: its captions and label only, no image bytes read)."""
        return self.shards.read(self.ref(index), image=image)

    def load_image(self, index: int) -> Image.Image:
        sample = self.sample(index)
        if sample.image is None:
            raise ImageLoadError(f"{sample.where}: {sample.problem or 'no image member'}")
        return decode_image(sample.image)

    def captions(self, index: int) -> list[str]:
        sample = self.sample(index, image=False)
        if sample.captions:
            return sample.captions
        classnames, labels = self.classnames, self.labels
        if classnames and labels is not None and 0 <= labels[index] < len(classnames):
            return [classnames[labels[index]]]  # a classification shard: its class name, as labelled sources give
        raise DataError(f"{sample.where} has no caption: {sample.problem or 'no .txt or .json caption member'}")

    def describe(self, index: int) -> str:
        index = check_index(index, len(self))
        return f"{os.path.abspath(self.shards.shards[int(self._shard[index])])}:{self._keys[index]}"

    # -- labels, read once -----------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray | None:
        """(num_samples,) int64 class labels, or None when no sample has one (read on first use)."""
        self._read_labels()
        return self._labels

    @property
    def classnames(self) -> list[str] | None:
        self._read_labels()
        return self._classnames

    def _read_labels(self) -> None:
        """One pass over the label and metadata members (no image, no caption file), kept."""
        if self._labels_read:
            return
        self._labels_read = True
        has_label = (self._offsets[:, _COLUMNS.index("cls")] >= 0) | (self._offsets[:, _COLUMNS.index("json")] >= 0)
        if not has_label.any():
            return
        labels = np.full(len(self), -1, dtype=np.int64)
        named: dict[int, str] = {}
        for index in np.flatnonzero(has_label):
            ref = self.ref(int(index))
            sample = self.shards.read(SampleRef(ref.shard, ref.position, ref.key, _label_members(ref)), image=False)
            if sample.label is not None:
                labels[index] = sample.label
                if sample.classname:
                    named.setdefault(sample.label, sample.classname)
        if (labels < 0).all():
            return
        missing = np.flatnonzero(labels < 0)
        if len(missing):
            raise DataError(
                f"{len(missing)} of {len(self)} samples in {self.shards.spec!r} have no label (first: "
                f"{self.describe(int(missing[0]))}) while the others have one; give every sample a .cls member, or "
                "a .json member with 'label'"
            )
        self._labels = labels
        if self._classnames is None and named:
            count = int(labels.max()) + 1
            self._classnames = [named.get(label, str(label)) for label in range(count)]


def _fill_row(ref: SampleRef, offsets: np.ndarray, sizes: np.ndarray) -> str:
    """Write ``ref``'s image/txt/json/cls members into one row of the index; returns the image's extension."""
    image_extension = ""
    for extension, offset, size in ref.members:
        if extension in IMAGE_EXTENSIONS:
            if image_extension:
                continue  # one image per sample: the first, as ShardSource.read takes it
            image_extension, column = extension, 0
        else:
            column = _COLUMNS.index(extension)
            if offsets[column] >= 0:
                continue
        offsets[column], sizes[column] = offset, size
    return image_extension


def _label_members(ref: SampleRef) -> tuple[tuple[str, int, int], ...]:
    """``ref``'s members that can hold a label (``.cls``, ``.json``): reading them reads no caption file."""
    return tuple(member for member in ref.members if member[0] in ("cls", "json"))
