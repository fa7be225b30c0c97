"""WebDataset tar shards: shard lists in brace notation or folders (``wds_layout.py``), an index of each shard's
samples, reading them.

Layout (what img2dataset and ``clipforge data pack`` write): consecutive tar members that share a key form
one sample, the key being the member name up to the first dot of its base name (webdataset's rule, reused
from the library). A sample holds an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and its caption in
``.txt``, or in ``.json`` as ``caption`` (or a ``captions`` list); an integer label may come as ``label`` in
the ``.json`` or as a ``.cls`` member.

Shards are read with ``tarfile`` in seekable mode rather than through webdataset's streaming pipeline: a
*scan* reads only the 512-byte member headers (seeking over the data) and records where each member's bytes
lie, and a sample's bytes are read (``os.pread``) only when the sample is used. Any position in the stream
is then reached by scanning headers, without reading or decoding a single skipped image (exact resume), and
the shuffle buffer holds small references instead of image bytes. The price: shards are local (or mounted)
uncompressed tar files, not ``pipe:`` or ``http`` URLs.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from clipforge.config import STREAMED
from clipforge.data.base import DataError, bounded_text
from clipforge.data.files import MAX_LINE_CHARS
from clipforge.data.wds_layout import resolve_layout

logger = logging.getLogger("clipforge")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_USED_EXTENSIONS = (*IMAGE_EXTENSIONS, "txt", "json", "cls")
_OPEN_SHARDS = 8  # file descriptors one process keeps open: the shuffle buffer spans a few shards at most
# The largest member read, whatever its header declares: an image file within the pixel limit is far smaller
# (a 40-megapixel JPEG is ~20 MB), a caption or JSON member within MAX_LINE_CHARS. A larger member makes its
# sample unreadable (skipped and counted) instead of being read whole.
MAX_IMAGE_MEMBER_BYTES = 128 << 20
MAX_TEXT_MEMBER_BYTES = MAX_LINE_CHARS


class NoReadableSampleError(DataError, RuntimeError):
    """Shards that hold no readable sample at all: a ``DataError`` (the command line prints it and exits 2);
    also a ``RuntimeError``, which the shard stream raised for it before."""


def expand_shards(spec: str) -> list[str]:
    """``"data/{00000..00002}.tar"`` -> ``["data/00000.tar", "data/00001.tar", "data/00002.tar"]``.

    Brace ranges and alternatives (``{a,b}``) expand as in the shell; several specs join with ``::``
    (webdataset's convention, whose expansion this is).
    """
    return [url for url in expand_urls(spec) if url]


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lies: shard number, its position among the shard's samples, and its members.

    ``members``: ``(extension, byte offset of the data, size)`` of each member the reader uses.
    """

    shard: int
    position: int
    key: str
    members: tuple[tuple[str, int, int], ...]


@dataclass
class ShardSample:
    """One sample's contents. ``problem`` says why it cannot be trained on ("" when it can)."""

    where: str
    image: bytes | None
    captions: list[str]
    label: int | None = None
    classname: str | None = None
    problem: str = ""
    image_extension: str = ""  # the image member's extension (jpg, png ...), "" without an image


@dataclass
class _OpenFiles:
    """A small LRU of read-only descriptors; reads are positional, so forked workers never share an offset."""

    pid: int = field(default_factory=os.getpid)
    descriptors: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():  # inherited from the parent through fork: open our own
            self.pid, self.descriptors = os.getpid(), OrderedDict()
        descriptor = self.descriptors.pop(path, None)
        if descriptor is None:
            descriptor = os.open(path, os.O_RDONLY)
            while len(self.descriptors) >= _OPEN_SHARDS:
                os.close(self.descriptors.popitem(last=False)[1])
        self.descriptors[path] = descriptor
        data = os.pread(descriptor, size, offset)
        if len(data) != size:
            raise OSError(f"{path}: expected {size} bytes at offset {offset}, the file ends after {len(data)}")
        return data


class ShardSource:
    """The samples of a list of WebDataset shards, with the stream options of ``data.kind='webdataset'``.

    Not a map-style :class:`~clipforge.data.base.ImageTextSource` (a tar has no index of its samples): a
    :class:`~clipforge.data.base.StreamingSource` (``capabilities`` say so), which the loader streams
    (``clipforge.data.streaming``); ``iter_samples`` reads it once in shard order.
    A shard that is missing or cannot be read is skipped with a warning naming it (once per process); the
    samples before a corrupt point of a shard are kept. ``count(shard)`` caches each shard's sample count.
    """

    capabilities = STREAMED

    def __init__(
        self, spec: str, shuffle_buffer: int = 1000, resample: bool = False, epoch_size: int | None = None
    ) -> None:
        self.spec = spec
        layout = resolve_layout(spec)
        self.shards = layout.shards if layout.shards is not None else expand_shards(spec)
        # what the shards' folder says (CLIP_benchmark's wds_<name>/ layout): class names in label order, prompt
        # templates, whether a .txt member holds one caption a line; None / False otherwise
        self.classnames: list[str] | None = layout.classnames
        self.templates: list[str] | None = layout.templates
        self.caption_lines = layout.caption_lines
        if not self.shards:
            raise DataError(f"data.kind='webdataset': the shard spec {spec!r} names no file")
        if not any(os.path.isfile(path) for path in self.shards):
            raise FileNotFoundError(
                f"data.kind='webdataset': none of the {len(self.shards)} shards of {spec!r} exists "
                f"(the first is {self.shards[0]!r}); shards must be local .tar files"
            )
        if resample and not epoch_size:
            raise DataError("data.resample=true needs data.epoch_size: the samples in one epoch over all ranks")
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.epoch_size = epoch_size
        self._counts: dict[int, int] = {}
        self._problems: dict[int, str] = {}  # what went wrong reading each shard, for the no-sample error
        self._warned: set[int] = set()
        self._files = _OpenFiles()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = _OpenFiles()  # descriptors do not travel to spawned workers
        return state

    def __repr__(self) -> str:
        return f"ShardSource({self.spec!r}, {len(self.shards)} shards)"

    # -- the index of a shard --------------------------------------------------------------------
    def _warn(self, shard: int, message: str) -> None:
        if shard not in self._warned:
            self._warned.add(shard)
            logger.warning("skipping %s", message)

    def scan(self, shard: int) -> list[SampleRef]:
        """The samples of shard number ``shard`` in file order, from its headers alone; [] if unreadable."""
        refs, problem = _scan_headers(self.shards[shard], shard)
        if problem:
            self._problems[shard] = problem
            self._warn(shard, problem)
        self._counts[shard] = len(refs)
        return refs

    def count(self, shard: int) -> int:
        """The number of samples in shard ``shard`` (a header scan the first time, cached after)."""
        if shard not in self._counts:
            self.scan(shard)
        return self._counts[shard]

    def all_empty(self) -> bool:
        """True once every shard has been scanned in this process and none held a sample: nothing to stream."""
        return len(self._counts) == len(self.shards) and not any(self._counts.values())

    def no_sample_error(self) -> NoReadableSampleError:
        """The error for shards that hold no readable sample at all, with the first shard's problem."""
        if self._problems:
            first = self._problems[min(self._problems)]
            return NoReadableSampleError(
                f"no readable sample in {self.spec!r}: all {len(self.shards)} shards failed (first: {first})"
            )
        return NoReadableSampleError(
            f"no readable sample in {self.spec!r}: all {len(self.shards)} shards are empty tar files; "
            "write them again (clipforge data pack)"
        )

    # -- reading samples -------------------------------------------------------------------------
    def read(self, ref: SampleRef, image: bool = True) -> ShardSample:
        """The contents of sample ``ref``; ``image=False`` reads only its caption and label members."""
        path = self.shards[ref.shard]
        where = f"{path}:{ref.key}"
        data: dict[str, bytes] = {}
        image_extension = ""
        try:
            for extension, offset, size in ref.members:
                is_image = extension in IMAGE_EXTENSIONS
                if (is_image and (not image or image_extension)) or extension in data:
                    continue  # one image per sample: the first
                if is_image:
                    image_extension = extension
                limit = MAX_IMAGE_MEMBER_BYTES if is_image else MAX_TEXT_MEMBER_BYTES
                if size > limit:
                    problem = f"its .{extension} member is {size:,} bytes, more than the {limit:,} clipforge reads"
                    return ShardSample(where, None, [], problem=problem)
                data["image" if is_image else extension] = self._files.read(path, offset, size)
        except OSError as error:
            return ShardSample(where, None, [], problem=f"cannot read the shard ({error})")
        sample = _parse_sample(where, data, image, self.caption_lines)
        sample.image_extension = image_extension
        return sample

    def iter_samples(self, image: bool = True) -> Iterator[ShardSample]:
        """Every sample of every shard, in shard order and file order (unreadable shards skipped).

        Raises ``DataError`` (:meth:`no_sample_error`) at the end when no shard held a single sample.
        """
        found = False
        for shard in range(len(self.shards)):
            for ref in self.scan(shard):
                found = True
                yield self.read(ref, image=image)
        if not found:
            raise self.no_sample_error()

    def iter_captions(self) -> Iterator[str]:
        """Every caption of every sample, reading no image bytes (for training a tokenizer).

        Raises ``DataError`` when the shards hold no readable sample, or samples without any caption, rather
        than handing the tokenizer nothing to learn from.
        """
        samples = captions = 0
        first_problem = ""
        for sample in self.iter_samples(image=False):
            samples += 1
            captions += len(sample.captions)
            if not first_problem and sample.problem:
                first_problem = f"{sample.where}: {sample.problem}"
            yield from sample.captions
        if not captions:
            raise DataError(
                f"none of the {samples} samples in {self.spec!r} has a caption (first: {first_problem}); a sample "
                "needs a .txt member, or a .json member with 'caption' or 'captions'"
            )


def _scan_headers(path: str, shard: int) -> tuple[list[SampleRef], str]:
    """The samples of one shard from its member headers, and what went wrong ("" if nothing did).

    The samples before a corrupt point are kept; a sample cut by truncation is not.
    """
    refs: list[SampleRef] = []
    key: str | None = None
    members: list[tuple[str, int, int]] = []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            while (member := tar.next()) is not None:
                tar.members = []  # keep no headers: a shard of 10^5 files would hold them all
                name_key, extension = base_plus_ext(member.name)
                if not member.isfile() or name_key is None:
                    continue
                if name_key != key:
                    if key is not None:
                        refs.append(SampleRef(shard, len(refs), key, tuple(members)))
                    key, members = name_key, []
                if extension.lower() in _USED_EXTENSIONS:
                    members.append((extension.lower(), member.offset_data, member.size))
            end = tar.offset
        # tarfile stops silently at a bad header after the first one: look for data past the end it saw
        with open(path, "rb") as handle:
            handle.seek(end)
            trailing = handle.read(1024)
    except FileNotFoundError:
        return [], f"shard {path}: the file is missing"
    except (tarfile.TarError, OSError) as error:
        # typically a truncated shard: the sample being read may be cut, the ones before it are whole
        return refs, f"shard {path} after {len(refs)} samples: not a readable uncompressed tar ({error})"
    if key is not None:
        refs.append(SampleRef(shard, len(refs), key, tuple(members)))
    if trailing.strip(b"\0"):
        return refs, f"the rest of shard {path} after {len(refs)} samples: bad tar header at byte {end}"
    if refs and any(offset + length > size for _, offset, length in refs[-1].members):
        refs.pop()
        return refs, f"the last sample of shard {path}: the file is truncated"
    return refs, ""


def _parse_sample(where: str, data: dict[str, bytes], want_image: bool, caption_lines: bool = False) -> ShardSample:
    """Captions from ``json['captions']``, else ``.txt`` (each line a caption with ``caption_lines``, as in
    CLIP_benchmark's retrieval shards), else ``json['caption']``; label from json or .cls."""
    problems = []
    meta: dict = {}
    if "json" in data:
        try:
            meta = json.loads(data["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(f"unreadable .json ({error})")
        if not isinstance(meta, dict):
            meta = {}
    captions: list[str] = []
    if isinstance(meta.get("captions"), list):
        captions = [str(text) for text in meta["captions"] if isinstance(text, str)]
    if not captions and "txt" in data:
        text = data["txt"].decode("utf-8", errors="replace")
        captions = text.splitlines() if caption_lines else [text]
    if not captions and isinstance(meta.get("caption"), str):
        captions = [meta["caption"]]
    captions = [bounded_text(text.strip()) for text in captions if text and text.strip()]
    if not captions:
        problems.append("no caption (a .txt member, or a .json member with 'caption' or 'captions')")
    label = meta.get("label")
    if label is None and "cls" in data:
        try:
            label = int(data["cls"].decode("ascii").strip())
        except ValueError:
            problems.append("a .cls member that is not an integer")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        problems.append(f"label {label!r} is not an integer")
        label = None
    image = data.get("image")
    if want_image and image is None:
        problems.append(f"no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
    classname = meta.get("classname") if isinstance(meta.get("classname"), str) else None
    return ShardSample(where, image, captions, label, classname, "; ".join(problems))
