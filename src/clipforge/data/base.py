"""The source interface every loader consumes, and the one image decoder every source uses.

A source is a map from an image index to a decoded RGB picture and that image's captions. It does no
transforms and no tokenization (``transforms.py`` and ``tokenize.py`` do) and touches no file until an
image is asked for, so a manifest of a million rows opens in seconds and a missing file costs one
skipped sample (``ImageLoadError``), not a crashed run. A streamed source (WebDataset shards) is read front to
back instead; every source says which it is through its ``capabilities`` (:func:`capabilities_of`), and callers
ask that rather than test its class.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipforge.config import MAP_STYLE, SourceCapabilities

# the errors live below torch so the command line names them without loading it; re-exported here
from clipforge.config.errors import DataError, ImageLoadError, ImageTooLargeError  # noqa: F401

if TYPE_CHECKING:
    from clipforge.data.shards import SampleRef, ShardSample


# The largest image (width x height) any clipforge path decodes: 40 megapixels (e.g. 8000 x 5000) covers camera
# photos, while one decoded RGB picture stays under ~120 MB. Larger ones raise ImageTooLargeError before decoding.
MAX_IMAGE_PIXELS = 40_000_000


# The most characters of one caption clipforge keeps: far more than any context holds (a token covers at least a
# character, and 16,384 characters fill 512 tokens many times over), so a tokenizer's ids are those of the whole
# text, while a 100 MB caption costs no more than this to store and tokenize. Sources cut captions when they
# read them, and tokenizers cut every text they are given.
MAX_TEXT_CHARS = 16_384


def bounded_text(text: str) -> str:
    """``text`` cut to :data:`MAX_TEXT_CHARS` characters."""
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS]


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto white, 16-bit values scaled (not clipped)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255, which turns every mid-grey white.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)  # 65535 / 255 = 257
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0  # float images come in [0, 1] or [0, 255]
        grey = np.clip(np.round(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")  # also applies a palette's or a tRNS chunk's transparent colour
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # L, 1, P, CMYK (Pillow already undid Adobe's inverted CMYK JPEGs), YCbCr


def decode_image(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview, max_side: int | None = None
) -> Image.Image:
    """Open an image file (or its bytes) fully and return it upright, in RGB.

    EXIF orientation is applied (``ImageOps.exif_transpose``); alpha (RGBA, LA, palette or single-colour
    transparency) is composited onto white; CMYK, palette, greyscale and 1-bit images are converted;
    16-bit greyscale (``I;16``, ``I``) is scaled to 8 bits (value / 257), not clipped. The pixels are
    decoded here (``load()``), so a truncated file fails here and not later inside a transform.

    Size limit: an image of more than :data:`MAX_IMAGE_PIXELS` (40 million) pixels, ``width * height`` as
    its header declares, raises :class:`ImageTooLargeError` before any pixel is decoded, so a decompression
    bomb (a small file declaring a huge canvas) allocates nothing; Pillow's own bomb guard stays behind it
    as a second line and raises the same error.

    ``max_side``: only a picture of about this size is needed (a thumbnail): a JPEG is then decoded at the
    smallest of the scales 1/8, 1/4, 1/2, 1 that keeps both sides at least ``max_side`` (libjpeg scales while it
    decodes, so a 36-megapixel photo costs a 750 x 750 image, not 108 MB); other formats decode whole.

    Raises ``ImageLoadError`` naming the file and the reason: missing, unreadable (or not a regular file: a pipe
    named like an image would block), not an image, truncated or corrupt, or too large (``ImageTooLargeError``).
    """
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    label = f"<{len(path_or_bytes)} bytes>" if is_bytes else str(path_or_bytes)
    handle = io.BytesIO(bytes(path_or_bytes)) if is_bytes else open_regular_file(path_or_bytes, "image file")
    with handle:
        try:
            with Image.open(handle) as image:
                _check_size(image, label)  # from the header alone: before load() allocates the pixels
                if max_side is not None and image.format == "JPEG":
                    image.draft("RGB", (max_side, max_side))
                image.load()
                upright = _exif_upright(image)
                return _to_rgb(upright)
        except UnidentifiedImageError:
            raise ImageLoadError(f"{label}: not an image Pillow can identify (corrupt, or not an image)") from None
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(f"{label}: too large to decode safely ({error})") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            # Pillow reports truncation as OSError("image file is truncated ...") and broken streams as
            # SyntaxError/ValueError depending on the codec; all mean the pixels cannot be trusted.
            raise ImageLoadError(f"{label}: truncated or corrupt image data ({error})") from error


def open_regular_file(path: str | os.PathLike, what: str = "file") -> io.BufferedReader:
    """``open(path, "rb")`` for a regular file; ``ImageLoadError`` for anything else, before it can block.

    A FIFO, socket or device named like an image (``x.png``) would block ``open`` or ``read`` forever (a FIFO
    waits for a writer) while the caller holds its folder's lock; so the file is opened without blocking and
    refused unless ``fstat`` says it is a regular file. ``what`` names it in messages (``image file``).
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: {what} is missing") from None
    except OSError as error:
        raise ImageLoadError(f"{path}: cannot read the {what} ({error.strerror or error})") from error
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
            raise ImageLoadError(f"{path}: {kind}; expected an {what}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _check_size(image: Image.Image, label: str) -> None:
    """Raise ``ImageTooLargeError`` when the declared ``width * height`` exceeds :data:`MAX_IMAGE_PIXELS`."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"{label}: {width}x{height} = {width * height:,} pixels is more than the {MAX_IMAGE_PIXELS:,} pixels "
            "clipforge decodes (clipforge.data.base.MAX_IMAGE_PIXELS); shrink the image"
        )


_EXIF_ORIENTATION = 0x0112


def _exif_upright(image: Image.Image) -> Image.Image:
    """The image rotated/flipped as its EXIF orientation says; a broken EXIF block leaves it as stored. An image
    that needs no turn is returned as it is, not copied (a copy would double a large photo's peak memory)."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # the pixels are fine; only the orientation tag is unreadable
        return image


# ----------------------------------------------------------------------------------------------
# The interface the loader consumes
# ----------------------------------------------------------------------------------------------
@runtime_checkable
class ImageTextSource(Protocol):
    """Images with one or more captions each, and optionally a class label per image.

    ``labels``: (num_images,) int class ids into ``classnames``, or None when the source has no classes.
    """

    labels: np.ndarray | None
    classnames: list[str] | None

    def __len__(self) -> int:
        """Number of images (not captions)."""
        ...

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` in RGB; raises ``ImageLoadError`` when it is missing or cannot be decoded."""
        ...

    def captions(self, index: int) -> list[str]:
        """All captions of image ``index`` (at least one)."""
        ...

    def describe(self, index: int) -> str:
        """Where image ``index`` comes from (a path or a key), for logs and error reports."""
        ...


class StreamingSource(Protocol):
    """Samples read front to back from shards, without an index (``capabilities.streaming``): WebDataset shards
    (``clipforge.data.shards.ShardSource``). The training loader streams them (``clipforge.data.streaming``).

    ``shards``: the shard files. ``iter_samples``: every sample once, in shard and file order (``image=False``
    skips reading the images); ``iter_captions``: their captions, reading no image. ``scan(shard)``: a shard's
    samples from its headers alone; ``read(ref)``: one sample's contents (what gives ``embed`` an index).
    """

    capabilities: SourceCapabilities
    shards: list[str]

    def iter_samples(self, image: bool = True) -> Iterator[ShardSample]: ...

    def iter_captions(self) -> Iterator[str]: ...

    def scan(self, shard: int) -> list[SampleRef]: ...

    def read(self, ref: SampleRef, image: bool = True) -> ShardSample: ...


# any source build_source gives: map-style (random access) or streamed
Source = ImageTextSource | StreamingSource


def capabilities_of(source: Source) -> SourceCapabilities:
    """What ``source`` can do: its class's ``capabilities``; a source that declares none is map-style
    (``MAP_STYLE``), which is what the :class:`ImageTextSource` interface promises."""
    return getattr(source, "capabilities", MAP_STYLE)


def check_index(index: int, length: int) -> int:
    """``index`` as an int when it lies in ``[0, length)``; IndexError otherwise (sources call it first)."""
    if not 0 <= index < length:
        raise IndexError(f"image index {index} is out of range for a source of {length} images")
    return int(index)
