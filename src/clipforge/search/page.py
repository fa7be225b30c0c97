"""What the web page's endpoints answer (:class:`SearchPage`), over one opened index, within bounds.

Memory and load stay bounded whatever the requests (``ServerLimits``, ``clipforge.search.bounds``): an image over
``MAX_IMAGE_PIXELS`` is a 413; a JPEG file decodes at 1/2, 1/4 or 1/8 scale when that still gives ``THUMBNAIL`` px a
side (``decode_reduced``); other images decode whole (36 megapixels: ~108 MB, twice that while turned upright), at
most ``full_decodes`` at once, and only their ``THUMBNAIL`` px copy outlives the decode; explain colours the center
square the model sees at ``THUMBNAIL`` px. At most ``heavy_requests`` explains and ``image_requests`` thumbnails run
at once, one model call at a time; a request that waits longer than its limit gets a 503 (``Retry-After``); a failed
allocation while decoding is a 503 too.

Paths: the API shows an image's id and path relative to the folder of the source it was embedded from
(``photos/cat.jpg`` for ``/data/photos/cat.jpg`` embedded from ``/data``; the file name when it lies
elsewhere) and the checkpoint by its file name, so it does not reveal the server's folders; ``--show-paths``
(``show_paths=True``) shows them as stored. Only rows of the index are served: the server never opens a path that
a request names.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from clipforge.data.base import (
    MAX_IMAGE_PIXELS,
    DataError,
    ImageLoadError,
    ImageTooLargeError,
    decode_image,
    open_regular_file,
)
from clipforge.data.transforms import ImagePreprocess, eval_view_box
from clipforge.explain.heatmap import explain as explain_pairs
from clipforge.explain.heatmap import resolve_method
from clipforge.search.bounds import BadRequest, Gate, ServerLimits, parse_k, parse_query, parse_row
from clipforge.search.index import Index, SearchHit
from clipforge.viz import overlay_heatmap

THUMBNAIL = 512


def overlay_input(picture: Image.Image, preprocess: ImagePreprocess, side: int = THUMBNAIL) -> Image.Image:
    """The part of ``picture`` the model sees (``eval_view_box``: the center crop, or all of a squashed image; what
    explain's heat map covers), at most ``side`` px on its longer side: the heat map is coloured at this size, so
    a 40-megapixel photo costs a 512 px overlay rather than gigabytes of float colour maps."""
    box = eval_view_box(preprocess, picture.width, picture.height)
    width, height = box[2] - box[0], box[3] - box[1]
    scale = min(1.0, side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # cropped and downscaled in one pass: no full-size copy of the region (~100 MB at 36 megapixels)
    return picture.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def decode_reduced(path: str, side: int = THUMBNAIL) -> Image.Image | None:
    """A JPEG file decoded at a reduced scale that keeps both sides at least ``side`` px (``decode_image``'s
    ``max_side``); None for any other format, or for anything unusual (over the pixel limit, unreadable, corrupt):
    the caller then decodes it whole, behind the gate of full decodes, which reports it the usual way."""
    try:
        # the header only (a regular file: a FIFO named x.jpg would block open() forever)
        with open_regular_file(path, "image file") as handle, Image.open(handle) as image:
            if image.format != "JPEG":
                return None
        return decode_image(path, max_side=side)
    except Exception:  # every failure is reported by the usual decoder, which runs next
        return None


def _thumbnail(picture: Image.Image) -> Image.Image:
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    return picture


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def _source_root(spec: str) -> str | None:
    """The folder an image source's ids are shown relative to: the folder itself, else the spec's folder
    (a manifest's, a data config's, shards'); None for a recipe name (its ids are not server paths)."""
    path = Path(spec)
    if not path.is_absolute():
        return None
    return str(path if path.is_dir() else path.parent).rstrip(os.sep) + os.sep


class SearchPage:
    """What the endpoints answer, over one opened index; the routes only pass their parameters here."""

    def __init__(self, index: Index, explain_method: str, show_paths: bool, limits: ServerLimits) -> None:
        if index.loaded is None:
            raise ValueError("the web page needs the model: open the index with its checkpoint")
        if index.kind != "images":
            raise ValueError("the web page searches images: open the index with kind='images'")
        self.index = index
        # a method the image tower lacks fails here, when the server starts, not on every request
        self.method = resolve_method(index.loaded, explain_method)
        self.preprocess = index.loaded.processor.preprocess
        self.show_paths = show_paths
        self.roots = [_source_root(spec) for spec in index.store.meta["sources"]]
        # one model call at a time: requests run in a thread pool, and two CPU-bound passes would only thrash
        self.model = Gate(1, limits.model_wait_s, "queries")
        self.heavy = Gate(limits.heavy_requests, limits.heavy_wait_s, "heat maps")
        self.images = Gate(limits.image_requests, limits.image_wait_s, "images")
        self.decodes = Gate(limits.full_decodes, limits.image_wait_s, "large images")
        self.gates = (self.model, self.heavy, self.images, self.decodes)

    # -- the endpoints ---------------------------------------------------------------------------------
    def info(self) -> dict:
        model = self.index.store.meta["model"]
        return {
            "count": len(self.index),
            "checkpoint": model["checkpoint"] if self.show_paths else Path(model["checkpoint"]).name,
            "step": model["step"],
            "backend": "faiss" if self.index.faiss is not None else "exact",
            "explain_method": self.method,
        }

    def search(self, q: str, k: str) -> dict:
        text = parse_query(q, "the query is empty: type what the image should show")
        count = parse_k(k)
        with self.model.enter():
            return self._payload(self.index.search(text=text, k=count))

    def similar(self, row: str, k: str) -> dict:
        query_row, count = parse_row(row, len(self.index)), parse_k(k)
        with self.model.enter():
            return self._payload(self.index.search(row=query_row, k=count))

    def thumbnail(self, key: str) -> bytes:
        row = parse_row(key, len(self.index))
        with self.images.enter():
            return _encode(self._load(row, _thumbnail), "JPEG")

    def explain(self, row: str, q: str) -> bytes:
        image_row = parse_row(row, len(self.index))
        text = parse_query(q, "explain needs the query text")
        with self.heavy.enter():
            square = self._load(image_row, lambda picture: overlay_input(picture, self.preprocess))
            with self.model.enter():
                explanation = explain_pairs(self.index.loaded, [square], [text], self.method)[0][0]
            return _encode(overlay_heatmap(explanation.image, explanation.heatmap), "PNG")

    # -- helpers ---------------------------------------------------------------------------------------
    def shown(self, row: int, text: str) -> str:
        """``text`` (row's id or path) as the API shows it: as stored with ``show_paths``; else relative to
        its source's folder, or only its file name when it is an absolute path outside that folder."""
        if self.show_paths or not os.path.isabs(text):
            return text
        number = int(self.index.table.sources[row])
        root = self.roots[number] if 0 <= number < len(self.roots) else None
        if root is not None and text.startswith(root):
            return text[len(root) :]
        return os.path.basename(text)

    def _payload(self, hits: list[SearchHit]) -> dict:
        results = []
        for hit in hits:
            shown_id = self.shown(hit.row, hit.id)
            results.append(
                {
                    "rank": hit.rank,
                    "row": hit.row,
                    "name": os.path.basename(self.shown(hit.row, hit.path) or shown_id),
                    "id": shown_id,
                    "path": self.shown(hit.row, hit.path),
                    "score": round(hit.score, 5),
                    "image": f"/image/{hit.row}",
                }
            )
        return {"results": results}

    def _load(self, row: int, shrink: Callable[[Image.Image], Image.Image]) -> Image.Image:
        """``shrink`` of the image of ``row``. A JPEG file decodes at a reduced scale; any other image decodes
        whole, at most ``full_decodes`` at once, and only what ``shrink`` makes of it leaves this gate."""
        path = self.index.table.paths[row]
        picture = decode_reduced(path) if path else None
        if picture is not None:
            return shrink(picture)
        with self.decodes.enter():
            return shrink(self._decode(row))

    def _decode(self, row: int) -> Image.Image:
        """The image of ``row`` at full size; 413 over ``MAX_IMAGE_PIXELS``, 404 when it cannot be read now, 503
        when there is no memory for it now."""
        try:
            picture = self.index.load_image(row)
        except ImageTooLargeError:
            raise self._too_large(row) from None
        except MemoryError:
            raise BadRequest(503, f"the server has no memory to decode image {row} now; try again later") from None
        except (ImageLoadError, DataError, OSError) as error:
            raise BadRequest(404, f"image {row} cannot be read now: {self._without_folders(row, str(error))}") from None
        if picture.width * picture.height > MAX_IMAGE_PIXELS:  # a source that decodes without the check
            raise self._too_large(row)
        return picture

    def _too_large(self, row: int) -> BadRequest:
        return BadRequest(
            413, f"image {row} is larger than {MAX_IMAGE_PIXELS:,} pixels: too large for the page to show"
        )

    def _without_folders(self, row: int, message: str) -> str:
        """An error message with the row's stored id, and the sources' folders, shown as the API shows paths."""
        if self.show_paths:
            return message
        stored = self.index.table.ids[row]
        message = message.replace(stored, self.shown(row, stored))
        for root in filter(None, self.roots):
            message = message.replace(root, "")
        return message
