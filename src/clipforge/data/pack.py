"""``clipforge data pack`` (any source -> WebDataset shards) and ``clipforge data inspect`` (what a source holds).

Packed shards use img2dataset's layout, so ``data.kind: webdataset`` (and any WebDataset reader) reads them:
per sample ``{key}.jpg`` (or ``.png``/``.webp``: the original file's bytes when it needs no resizing) and
``{key}.json`` with ``caption`` (the first), ``captions`` (all) and, for labelled sources, ``label`` and
``classname``. Keys are the running sample number (``000000042``); shards are ``{00000..N}.tar``.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from clipforge.config import DataConfig
from clipforge.data.base import DataError, ImageLoadError, Source, capabilities_of, decode_image
from clipforge.data.sources import build_source
from clipforge.folders import folder_lock, scratch_folder

logger = logging.getLogger("clipforge")

# file suffix -> the tar member extension its bytes are stored under, unchanged
_KEPT_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_REPORTED_PROBLEMS = 5  # unreadable samples named in the log; the rest are only counted


@dataclass
class _Record:
    """One image of any source, as pack and inspect need it."""

    where: str
    encoded: bytes | None  # the image file's own bytes, when the source has them and the format is kept
    extension: str  # the member extension for ``encoded``
    load: Callable[[], Image.Image]  # decodes (raises ImageLoadError)
    captions: list[str]
    label: int | None = None
    classname: str | None = None
    problem: str = ""  # why the sample is unusable before any decoding ("" = no reason yet)


def _raise(error: str) -> Image.Image:
    raise ImageLoadError(error)


def _packable(source: Source, kind: str) -> Source:
    """``source`` when its capabilities say it can be packed (and so inspected), else a ``DataError``."""
    if not capabilities_of(source).packable:
        raise DataError(f"data.kind={kind!r}: its source cannot be packed or inspected")
    return source


def _records(source: Source) -> Iterator[_Record]:
    """Every image of ``source`` in its own order: by index when it has random access, else (shards) as it streams,
    in shard and file order."""
    if not capabilities_of(source).random_access:
        for sample in source.iter_samples():
            load = partial(decode_image, sample.image) if sample.image is not None else partial(_raise, "no image")
            extension = "jpg" if sample.image_extension == "jpeg" else sample.image_extension
            yield _Record(
                sample.where,
                sample.image,
                extension,
                load,
                sample.captions,
                sample.label,
                sample.classname,
                sample.problem,
            )
        return
    for index in range(len(source)):
        where = source.describe(index)
        # file sources describe an image by its path: keep its bytes rather than decode and re-encode them
        path = Path(where)
        extension = _KEPT_FORMATS.get(path.suffix.lower())
        encoded = path.read_bytes() if extension and path.is_file() else None
        label = int(source.labels[index]) if source.labels is not None else None
        classnames = source.classnames
        classname = classnames[label] if classnames and label is not None and 0 <= label < len(classnames) else None
        captions = source.captions(index)
        yield _Record(where, encoded, extension or "jpg", partial(source.load_image, index), captions, label, classname)


# ----------------------------------------------------------------------------------------------
# pack
# ----------------------------------------------------------------------------------------------
@dataclass
class PackResult:
    """What ``pack_source`` wrote: the shard files, the brace spec that names them, and the counts."""

    out_dir: Path
    shards: list[Path]
    spec: str
    written: int
    skipped: int


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _sample(record, image: Image.Image, key: str, max_side: int | None, jpeg_quality: int) -> dict[str, object]:
    """One WebDataset sample: the image's bytes (its own file's when they can be kept) and its JSON metadata."""
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        encoded, extension = _encode_jpeg(image, jpeg_quality), "jpg"
    elif record.encoded is not None:
        encoded, extension = record.encoded, record.extension
    else:
        encoded, extension = _encode_jpeg(image, jpeg_quality), "jpg"
    meta = {"caption": record.captions[0], "captions": record.captions}
    if record.label is not None:
        meta["label"] = record.label
    if record.classname is not None:
        meta["classname"] = record.classname
    return {"__key__": key, extension: encoded, "json": json.dumps(meta, ensure_ascii=False).encode()}


def pack_source(
    config: DataConfig,
    out_dir: str | Path,
    shard_size: int = 1000,
    max_side: int | None = None,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> PackResult:
    """Write every readable image of the source ``config`` describes as WebDataset shards in ``out_dir``.

    ``max_side``: images with a longer side are shrunk to it (aspect kept) and stored as JPEG; without it,
    and for images already small enough, JPEG/PNG/WebP files keep their own bytes (no quality loss) and
    other images (arrays, other formats) are encoded as JPEG at ``jpeg_quality``. Unreadable images (or
    samples without a caption) are left out, counted and logged.

    ``out_dir`` holding ``.tar`` files is refused (old shards never mix with new ones) unless ``overwrite``:
    then they are replaced, but only once the new shards are all written. The shards are written into a scratch
    folder inside ``out_dir`` and moved into place at the end, so an interrupted pack leaves the folder as it was;
    one pack writes a folder at a time (:func:`clipforge.io.folder_lock`).
    """
    from webdataset import TarWriter

    if shard_size < 1:
        raise ValueError(f"--shard-size={shard_size} must be positive")
    if max_side is not None and max_side < 1:
        raise ValueError(f"--max-side={max_side} must be positive")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.glob("*.tar")) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds .tar files; pack into another folder, or add --overwrite to replace them"
        )
    source = _packable(build_source(config), config.kind)  # before the folder is made: a bad one leaves nothing
    shards: list[Path] = []
    written = skipped = 0
    with folder_lock(out_dir, "data pack"), scratch_folder(out_dir) as scratch:
        writer = None
        try:
            for record in _records(source):
                try:
                    if record.problem:
                        raise ImageLoadError(record.problem)
                    image = record.load()
                except ImageLoadError as error:
                    skipped += 1
                    if skipped <= _REPORTED_PROBLEMS:
                        logger.warning("not packed: %s: %s", record.where, error)
                    continue
                if written % shard_size == 0:
                    if writer is not None:
                        writer.close()
                    shards.append(Path(f"{len(shards):05d}.tar"))
                    # a fixed time: packing twice gives equal files
                    writer = TarWriter(str(scratch / shards[-1]), mtime=0.0)
                writer.write(_sample(record, image, f"{written:09d}", max_side, jpeg_quality))
                written += 1
        finally:
            if writer is not None:
                writer.close()
        if not shards:
            raise DataError(f"data.kind={config.kind!r}: no readable image to pack ({skipped} unreadable)")
        for old in sorted(out_dir.glob("*.tar")):  # only with overwrite (refused above otherwise)
            old.unlink()
        for shard in shards:
            (scratch / shard).replace(out_dir / shard)
    if skipped:
        logger.warning("%d unreadable images were left out", skipped)
    shards = [out_dir / shard for shard in shards]
    last = len(shards) - 1
    spec = str(out_dir / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))
    return PackResult(out_dir, shards, spec, written, skipped)


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------
@dataclass
class InspectReport:
    """Counts over a source. ``caption_words``: min, mean, median, max words per caption."""

    kind: str
    images: int = 0
    unreadable: int = 0
    unreadable_examples: list[str] = field(default_factory=list)
    captions: int = 0
    caption_words: dict[str, float] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)  # class name (or id) -> images, labelled sources only
    shards: int | None = None
    grid: Path | None = None

    def format(self) -> str:
        """The report as the lines ``clipforge data inspect`` prints."""
        lines = [f"kind: {self.kind}" + (f" ({self.shards} shards)" if self.shards is not None else "")]
        lines.append(f"images: {self.images} ({self.unreadable} unreadable)")
        lines += [f"  unreadable: {example}" for example in self.unreadable_examples]
        per_image = self.captions / self.images if self.images else 0.0
        lines.append(f"captions: {self.captions} ({per_image:.2f} per image)")
        if self.caption_words:
            words = self.caption_words
            lines.append(
                f"caption words: min {words['min']:.0f}, mean {words['mean']:.1f}, "
                f"median {words['median']:.1f}, max {words['max']:.0f}"
            )
        if self.classes:
            lines.append(f"classes: {len(self.classes)}")
            lines += [f"  {name}: {count}" for name, count in self.classes.items()]
        if self.grid is not None:
            lines.append(f"sample grid: {self.grid}")
        return "\n".join(lines)


def inspect_source(
    config: DataConfig, grid: str | Path | None = None, grid_images: int = 16, limit: int | None = None
) -> InspectReport:
    """Count the images, captions and labels of a source, decode every image to count unreadable ones, and
    (with ``grid``) draw the first ``grid_images`` readable images with their first caption as a PNG.

    ``limit``: look at the first ``limit`` images only (a quick look at a large set).
    """
    from clipforge.viz import plot_sample_grid

    source = _packable(build_source(config), config.kind)
    streamed = capabilities_of(source).streaming and not capabilities_of(source).random_access
    report = InspectReport(config.kind, shards=len(source.shards) if streamed else None)
    word_counts: list[int] = []
    classes: Counter = Counter()
    shown: list[tuple[Image.Image, str]] = []
    for record in _records(source):
        if limit is not None and report.images >= limit:
            break
        report.images += 1
        report.captions += len(record.captions)
        word_counts += [len(caption.split()) for caption in record.captions]
        if record.label is not None:
            classes[record.classname or str(record.label)] += 1
        try:
            if record.problem:
                raise ImageLoadError(record.problem)
            image = record.load()
        except ImageLoadError as error:
            report.unreadable += 1
            if len(report.unreadable_examples) < _REPORTED_PROBLEMS:
                report.unreadable_examples.append(f"{record.where}: {error}")
            continue
        if grid is not None and len(shown) < grid_images:
            image.thumbnail((256, 256))  # the grid cell is small: keep no full-size picture in memory
            shown.append((image, record.captions[0] if record.captions else ""))
    if word_counts:
        report.caption_words = {
            "min": float(min(word_counts)),
            "mean": statistics.fmean(word_counts),
            "median": float(statistics.median(word_counts)),
            "max": float(max(word_counts)),
        }
    report.classes = dict(sorted(classes.items(), key=lambda item: (-item[1], item[0])))
    if grid is not None and shown:
        title = f"{config.kind}: {config.get('path') or config.get('split', '')}"
        report.grid = plot_sample_grid(
            [image for image, _ in shown], [caption for _, caption in shown], grid, title=title
        )
    return report
