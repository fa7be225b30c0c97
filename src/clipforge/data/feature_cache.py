"""Features of locked towers, computed once and read from disk in training (LiT with cached features).

A :class:`FeatureStore` is one cache entry: a float32 array (rows, dim) in ``features.npy``, opened memory-mapped,
in a folder named by the hash of everything the features depend on (the *identity*: tower, weights,
preprocessing, data, view; see ``clipforge.train.cache_features``). A change to any of them gives another
folder, so a stale entry is never read. Rows are filled in order, chunk by chunk; after each chunk the array is
flushed to disk and only then is the count of finished rows recorded (``progress.json``, replaced atomically),
so an interrupted build resumes after its last finished chunk and never trusts a row that was not written.

The training side is :class:`CachedFeatureDataset`: for the sampler's key ``(index, seed, visit)`` it returns
what the live path (``ImageTextDataset``) would feed the model, with a cached tower's input replaced by its
features: the image's view ``visit mod K`` of its ``K`` cached views, and the row of the caption the live path
would pick (``caption_choice``). With deterministic transforms the two paths therefore train on the same
numbers, and resuming stays exact (the sampler alone decides what is read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clipforge.data.base import ImageLoadError, ImageTextSource
from clipforge.data.samples import Batch, SkippedSample, caption_choice, prepare_sample
from clipforge.io import atomic_write_json

if TYPE_CHECKING:
    from clipforge.data.processor import Processor

FORMAT_VERSION = 1
FEATURES_FILE = "features.npy"
PROGRESS_FILE = "progress.json"
IDENTITY_FILE = "identity.json"


def identity_key(identity: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able identity (sorted keys), naming the entry's folder."""
    text = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an advisory lock on ``folder`` so that two runs sharing a cache do not fill one entry together."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: runs sharing a cache must then not build the same entry at once
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FeatureStore:
    """One cache entry under ``root/<name>-<identity key>/``: ``(num_rows, dim)`` float32 features.

    Opening an entry whose folder holds a different identity, shape or format (a hash collision or a damaged
    entry) starts it afresh. ``rows_done`` rows are finished; :meth:`fill` computes the rest.
    """

    def __init__(self, root: str | Path, name: str, identity: dict[str, Any], num_rows: int, dim: int) -> None:
        self.identity = {"name": name, "num_rows": num_rows, "dim": dim, **identity}
        self.folder = Path(root) / f"{name}-{identity_key(self.identity)}"
        self.num_rows, self.dim = num_rows, dim

    @property
    def path(self) -> Path:
        return self.folder / FEATURES_FILE

    @property
    def rows_done(self) -> int:
        progress = self.folder / PROGRESS_FILE
        if not progress.is_file():
            return 0
        try:
            return int(json.loads(progress.read_text())["rows_done"])
        except (ValueError, KeyError, TypeError):
            return 0

    @property
    def complete(self) -> bool:
        return self.rows_done >= self.num_rows

    def _open_for_writing(self) -> np.memmap:
        self.folder.mkdir(parents=True, exist_ok=True)
        identity_path = self.folder / IDENTITY_FILE
        same = identity_path.is_file() and json.loads(identity_path.read_text()) == json.loads(
            json.dumps(self.identity, default=str)
        )
        if same and self.path.is_file():
            features = np.load(self.path, mmap_mode="r+")
            if features.shape == (self.num_rows, self.dim) and features.dtype == np.float32:
                return features
        # a new entry, or one whose files do not match what it should hold: start it afresh
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        atomic_write_json(identity_path, self.identity, replace=True)
        return np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.num_rows, self.dim))

    def fill(
        self,
        compute: Callable[[int, int], np.ndarray],
        chunk_rows: int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Compute rows ``[rows_done, num_rows)`` with ``compute(start, stop) -> (stop - start, dim)`` in chunks
        of ``chunk_rows``; return how many rows were computed now (0 when the entry was complete).

        ``progress(rows)`` is called after each chunk. An exception (or Ctrl-C) leaves every finished chunk
        recorded, and the next ``fill`` continues from there.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.folder):
            features = self._open_for_writing()
            start = self.rows_done
            computed = 0
            while start < self.num_rows:
                stop = min(start + chunk_rows, self.num_rows)
                rows = np.asarray(compute(start, stop), dtype=np.float32)
                if rows.shape != (stop - start, self.dim):
                    raise ValueError(
                        f"feature rows {start}:{stop} have shape {rows.shape}, expected {(stop - start, self.dim)}"
                    )
                features[start:stop] = rows
                features.flush()  # the rows reach the file before the progress that vouches for them
                atomic_write_json(self.folder / PROGRESS_FILE, {"rows_done": stop}, replace=True)
                computed += stop - start
                if progress is not None:
                    progress(stop - start)
                start = stop
            del features
        return computed


@dataclass
class CachedFeatures:
    """The cached inputs of one training source.

    ``image_views``: K feature files, (num_images, F_image) each, or None when the image tower runs live;
    a NaN row marks an image that could not be read. ``text``: one file (num_captions, F_text) with the
    captions of image ``i`` at rows ``caption_offsets[i]:caption_offsets[i + 1]``, or None when the text tower
    runs live. Arrays are opened memory-mapped on first use in each process (loader workers included).
    """

    image_views: list[Path] | None = None
    text: Path | None = None
    caption_offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._opened: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # a worker started with spawn gets the paths, not copies of the mapped arrays
        return {key: value for key, value in self.__dict__.items() if key != "_opened"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._opened = {}

    def image_view(self, view: int) -> np.ndarray:
        key = f"image{view}"
        if key not in self._opened:
            self._opened[key] = np.load(self.image_views[view], mmap_mode="r")
        return self._opened[key]

    def text_rows(self) -> np.ndarray:
        if "text" not in self._opened:
            self._opened["text"] = np.load(self.text, mmap_mode="r")
        return self._opened["text"]


def caption_offsets(source: ImageTextSource) -> np.ndarray:
    """(num_images + 1,) int64: image ``i``'s captions are flattened rows ``offsets[i]:offsets[i + 1]``."""
    counts = [len(source.captions(index)) for index in range(len(source))]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class CachedFeatureDataset(Dataset):
    """``dataset[(index, seed[, visit])]`` -> ``(image, text)``: what ``ImageTextDataset`` gives, with a cached
    tower's input replaced by its features.

    image: the pixels (live image tower: loaded and transformed from ``seed`` as in ``prepare_sample``) or the
    feature row of view ``visit mod K``. text: the caption string (live text tower) or its feature row. The
    caption is the one ``caption_choice`` picks, as on the live path. An unreadable image gives a
    :class:`SkippedSample`.
    """

    def __init__(
        self,
        source: ImageTextSource,
        transform: Callable,
        features: CachedFeatures,
        caption_sampling: str = "random",
    ) -> None:
        self.source = source
        self.transform = transform
        self.features = features
        self.caption_sampling = caption_sampling

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | str] | SkippedSample:
        index, seed, *rest = key
        visit = rest[0] if rest else 0
        captions = self.source.captions(index)
        if self.features.image_views is not None:
            row = self.features.image_view(visit % len(self.features.image_views))[index]
            if np.isnan(row[0]):
                return SkippedSample(self.source.describe(index), "unreadable when the feature cache was built")
            image = torch.from_numpy(np.array(row))  # a copy: the mapped file stays read-only
            caption = captions[caption_choice(len(captions), seed, self.caption_sampling, visit)]
        else:
            try:
                loaded = self.source.load_image(index)
            except ImageLoadError as error:
                return SkippedSample(self.source.describe(index), str(error))
            image, caption = prepare_sample(loaded, captions, seed, self.transform, self.caption_sampling, visit)
        if self.features.text is None:
            return image, caption
        choice = caption_choice(len(captions), seed, self.caption_sampling, visit)
        row = self.features.caption_offsets[index] + choice
        return image, torch.from_numpy(np.array(self.features.text_rows()[row]))


class CachedCollator:
    """Stacks what :class:`CachedFeatureDataset` gives into a :class:`Batch`: cached features into
    ``image_features`` / ``text_features``, pixels into ``images``, captions tokenized as ``Collator`` does."""

    def __init__(self, processor: Processor, image_cached: bool, text_cached: bool) -> None:
        self.processor = processor
        self.image_cached = image_cached
        self.text_cached = text_cached

    def __call__(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor | str] | SkippedSample]) -> Batch:
        skipped = [s for s in samples if isinstance(s, SkippedSample)]
        good = [s for s in samples if not isinstance(s, SkippedSample)]
        if not good:
            return Batch(torch.empty(0), None, None, skipped)  # nothing to contrast; the trainer moves past it
        images = torch.stack([image for image, _ in good])
        batch = Batch(None, None, None, skipped)
        if self.image_cached:
            batch.image_features = images
        else:
            batch.images = images
        if self.text_cached:
            batch.text_features = torch.stack([text for _, text in good])
        else:
            tokens = self.processor.text([text for _, text in good])
            batch.input_ids, batch.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        return batch
