"""``clipforge serve``: a small web page over an embedding folder (FastAPI + uvicorn, the ``serve`` extra).

Endpoints (all GET; every answer to bad input is JSON ``{"error": message}`` with a 4xx status, never a
traceback, and an unknown route is a JSON 404 too):

- ``GET /``: the page (``page.html``): a search box, a grid of results with scores, click an image for
  similar images, and a toggle that overlays the heat map of the query text.
- ``GET /api/search?q=TEXT&k=12``: text -> images; ``GET /api/similar?row=R&k=12``: image -> images.
- ``GET /image/{row}``: the image of a row of the index, re-encoded as JPEG (at most ``THUMBNAIL`` px). Only
  rows of the index are served: anything else in the path (``../../etc/passwd``, an absolute path, a file
  name) is a 404, so the server never opens a path that a request names.
- ``GET /api/explain?row=R&q=TEXT``: that image with the heat map of TEXT on it (PNG, at most ``THUMBNAIL`` px).
- ``GET /api/info``: the index size, the model and the explain method.

Parameters are parsed once each (``parse_row``, ``parse_k``, ``parse_query``): a row is 1 to 18 ASCII digits
below the index size, ``k`` a whole number from 1 to ``MAX_K``, a query 1 to ``MAX_QUERY_CHARS`` characters.

Memory and load stay bounded whatever the requests (``ServerLimits``): an image over ``MAX_IMAGE_PIXELS`` is
a 413; a JPEG file decodes at 1/2, 1/4 or 1/8 scale when that still gives ``THUMBNAIL`` px a side
(``decode_reduced``); other images decode whole (36 megapixels: ~108 MB, twice that while turned upright), at
most ``full_decodes`` at once, and only their ``THUMBNAIL`` px copy outlives the decode; explain colours the
center square the model sees at ``THUMBNAIL`` px. At most ``heavy_requests`` explains and ``image_requests``
thumbnails run at once, one model call at a time; a request that waits longer than its limit gets a 503
(``Retry-After``); a failed allocation while decoding is a 503 too. The HTTP side (``clipforge.search.server``)
bounds the clients: headers complete within ``header_timeout_s`` (trickled bytes do not extend it), idle
connections close after ``keep_alive_s``, a client that stops reading is dropped after ``send_timeout_s``, at
most ``connections`` are open (a stalled one makes room for a newcomer, else the newcomer gets a JSON 503); the
heap gives freed pixel memory back. There are no uploads, so no request body to bound.

Paths: the API shows an image's id and path relative to the folder of the source it was embedded from
(``photos/cat.jpg`` for ``/data/photos/cat.jpg`` embedded from ``/data``; the file name when it lies
elsewhere) and the checkpoint by its file name, so it does not reveal the server's folders; ``--show-paths``
(``show_paths=True``) shows them as stored. The server binds 127.0.0.1 unless told otherwise: the page has
no authentication.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
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
from clipforge.search.index import Index, SearchHit
from clipforge.viz import overlay_heatmap

logger = logging.getLogger("clipforge")

THUMBNAIL = 512
MAX_K = 100
DEFAULT_K = "12"
MAX_QUERY_CHARS = 1000
# ASCII digits only ("²".isdigit() is True, but int("²") fails), and few enough that int() is cheap
_ROW = re.compile(r"[0-9]{1,18}")
_WHOLE_NUMBER = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True)
class ServerLimits:
    """How much work the server takes on at once; a request that waits longer than its limit gets 503."""

    heavy_requests: int = 2  # explains at once: each decodes an image, runs the model and colours a map
    heavy_wait_s: float = 10.0
    image_requests: int = 4  # thumbnails at once
    image_wait_s: float = 10.0
    full_decodes: int = 2  # full-size decodes at once (not JPEG files): up to ~240 MB each at the pixel limit
    model_wait_s: float = 30.0  # for the one model call at a time
    connections: int = 64  # open connections, and the HTTP timeouts below: see clipforge.search.server
    header_timeout_s: float = 10.0  # from ready-for-a-request to complete headers; trickled bytes do not extend it
    keep_alive_s: float = 5.0  # an idle connection between requests
    send_timeout_s: float = 30.0  # a client that stops reading its answer


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _fastapi():
    try:
        import fastapi
    except ImportError:
        raise ImportError("the web page needs FastAPI and uvicorn: pip install 'clipforge[serve]'") from None
    return fastapi


# -- parameters ------------------------------------------------------------------------------------------
def _shorten(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters for a message (a 5000-digit row number is not echoed whole)."""
    return text if len(text) <= limit else text[:limit] + "..."


def parse_row(text: str, count: int) -> int:
    """A row of an index of ``count`` rows, from its decimal text; anything else is a 404 (no such image)."""
    if not _ROW.fullmatch(text) or int(text) >= count:
        raise _BadRequest(404, f"no image {_shorten(text)!r} in the index: rows are 0 to {count - 1}")
    return int(text)


def parse_k(text: str) -> int:
    """The number of results: a whole number from 1 to ``MAX_K`` (else 400)."""
    if not _WHOLE_NUMBER.fullmatch(text) or not 1 <= int(text) <= MAX_K:
        raise _BadRequest(400, f"bad request: k={_shorten(text)} must be a whole number from 1 to {MAX_K}")
    return int(text)


def parse_query(text: str, missing: str) -> str:
    """A query text: not blank (else 400 with ``missing``), at most ``MAX_QUERY_CHARS`` characters."""
    if not text.strip():
        raise _BadRequest(400, missing)
    if len(text) > MAX_QUERY_CHARS:
        raise _BadRequest(400, f"bad request: the query has {len(text)} characters; at most {MAX_QUERY_CHARS}")
    return text


# -- the server's state ----------------------------------------------------------------------------------
class _Gate:
    """At most ``slots`` requests inside at once; one that cannot enter within ``wait_s`` gets a 503."""

    def __init__(self, slots: int, wait_s: float, work: str) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self.wait_s = wait_s
        self.work = work

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise _BadRequest(503, f"the server is busy with other {self.work}; try again in a moment")
        try:
            yield
        finally:
            self._slots.release()


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
        self.model = _Gate(1, limits.model_wait_s, "queries")
        self.heavy = _Gate(limits.heavy_requests, limits.heavy_wait_s, "heat maps")
        self.images = _Gate(limits.image_requests, limits.image_wait_s, "images")
        self.decodes = _Gate(limits.full_decodes, limits.image_wait_s, "large images")

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
            raise _BadRequest(503, f"the server has no memory to decode image {row} now; try again later") from None
        except (ImageLoadError, DataError, OSError) as error:
            raise _BadRequest(
                404, f"image {row} cannot be read now: {self._without_folders(row, str(error))}"
            ) from None
        if picture.width * picture.height > MAX_IMAGE_PIXELS:  # a source that decodes without the check
            raise self._too_large(row)
        return picture

    def _too_large(self, row: int) -> _BadRequest:
        return _BadRequest(
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


# -- the application --------------------------------------------------------------------------------------
def _add_routes(app, page: SearchPage) -> None:
    from fastapi.responses import HTMLResponse, Response

    html = (files("clipforge.search") / "page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/api/info")
    def info() -> dict:
        return page.info()

    @app.get("/api/search")
    def search(q: str = "", k: str = DEFAULT_K) -> dict:
        return page.search(q, k)

    @app.get("/api/similar")
    def similar(row: str = "", k: str = DEFAULT_K) -> dict:
        return page.similar(row, k)

    @app.get("/image/{key:path}")
    def image(key: str) -> Response:
        return Response(page.thumbnail(key), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/explain")
    def explain(row: str = "", q: str = "") -> Response:
        return Response(page.explain(row, q), media_type="image/png")


def _error(message: str, status: int):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers={"Retry-After": "2"} if status == 503 else None)


async def _bad_request(request, error: _BadRequest):
    return _error(error.message, error.status)


async def _not_routed(request, error):
    """Starlette's own 404 (no such route) and 405 (a method other than GET), as JSON like every other error."""
    if error.status_code == 404:
        return _error(f"no such page: {_shorten(request.url.path)}", 404)
    if error.status_code == 405:
        return _error(f"{_shorten(request.method)} is not allowed here: the page only answers GET", 405)
    return _error(str(error.detail), error.status_code)


async def _invalid(request, error):
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())
    return _error(f"bad request: {problems}", 400)


async def _failure(request, error: Exception):
    logger.exception("request %s failed", _shorten(request.url.path, 200))
    return _error(f"the server failed on this request ({type(error).__name__})", 500)


def _add_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app.add_exception_handler(_BadRequest, _bad_request)
    app.add_exception_handler(HTTPException, _not_routed)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _failure)


def create_app(
    index: Index, explain_method: str = "auto", show_paths: bool = False, limits: ServerLimits | None = None
):
    """The FastAPI application serving ``index`` (opened with its checkpoint, for text queries and explain).

    ``show_paths``: show ids, paths and the checkpoint as stored (absolute) instead of relative to their
    source's folder. ``limits``: how much work runs at once (``ServerLimits()`` by default).
    """
    fastapi = _fastapi()
    page = SearchPage(index, explain_method, show_paths, limits or ServerLimits())
    app = fastapi.FastAPI(title="clipforge search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.page = page
    _add_routes(app, page)
    _add_error_handlers(app)
    return app
