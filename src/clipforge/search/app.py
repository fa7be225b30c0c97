"""``clipforge serve``: a small web page over an embedding folder and its JSON API (FastAPI + uvicorn, the ``serve``
extra), documented at ``/docs`` (``/openapi.json``), measured at ``/metrics``.

Endpoints (all GET; every answer to bad input is JSON ``{"error": message}`` with a 4xx status, never a traceback,
and an unknown route is a JSON 404 too):

- ``GET /``: the page (``page.html``): a search box, a grid of results with scores, click an image for similar
  images, and a toggle that overlays the heat map of the query text.
- ``GET /api/search?q=TEXT&k=12``: text -> images; ``GET /api/similar?row=R&k=12``: image -> images.
- ``GET /image/{row}``: the image of a row of the index, re-encoded as JPEG (at most ``THUMBNAIL`` px). Only rows
  of the index are served: anything else in the path (``../../etc/passwd``, an absolute path, a file name) is a
  404, so the server never opens a path that a request names.
- ``GET /api/explain?row=R&q=TEXT``: that image with the heat map of TEXT on it (PNG, at most ``THUMBNAIL`` px).
- ``GET /api/info``: the index size, the model and the explain method.
- ``GET /metrics``: Prometheus's text format (``clipforge.search.metrics``); ``GET /docs``, ``/openapi.json``: the
  API's description, from the response models below.

What each endpoint answers, and the bounds it keeps, is :class:`~clipforge.search.page.SearchPage`'s; parameters
and limits are ``clipforge.search.bounds``'s. The HTTP side (``clipforge.search.server``) bounds the clients:
headers complete within ``header_timeout_s`` (trickled bytes do not extend it), idle connections close after
``keep_alive_s``, a client that stops reading is dropped after ``send_timeout_s``, at most ``connections`` are open
(a stalled one makes room for a newcomer, else the newcomer gets a JSON 503); the heap gives freed pixel memory
back. There are no uploads, so no request body to bound. The server binds 127.0.0.1 unless told otherwise: the page
has no authentication.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Literal

try:
    from fastapi import FastAPI, Path, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException
except ImportError:
    raise ImportError("the web page needs FastAPI and uvicorn: pip install 'clipforge[serve]'") from None

from clipforge.search.bounds import DEFAULT_K, MAX_K, MAX_QUERY_CHARS, BadRequest, ServerLimits, shorten
from clipforge.search.index import Index
from clipforge.search.metrics import MeasureRequests, ServerMetrics
from clipforge.search.page import THUMBNAIL, SearchPage

logger = logging.getLogger("clipforge")


# -- what the API answers (the OpenAPI page's schemas) -------------------------------------------------------------
class Hit(BaseModel):
    rank: int = Field(description="1 for the best result, then 2, 3, ...")
    row: int = Field(description="the result's row in the index: a `row` for /api/similar and /api/explain")
    name: str = Field(description="the image's file name (or its id's last part)")
    id: str = Field(description="the image's id: its path relative to the embedded folder, or `shard.tar:key`")
    path: str = Field(description='its file, relative to the embedded folder ("" when it is no file)')
    score: float = Field(description="cosine similarity of the query and the image, -1 to 1 (rounded to 5 places)")
    image: str = Field(description="the URL of its thumbnail: /image/{row}")


class Results(BaseModel):
    results: list[Hit] = Field(description="the best images, best first")


class Info(BaseModel):
    count: int = Field(description="images in the index")
    checkpoint: str = Field(description="the model's checkpoint (its file name, unless the server shows paths)")
    step: int | None = Field(description="the training step of that checkpoint")
    backend: Literal["faiss", "exact"] = Field(description="how the index is searched")
    explain_method: str = Field(description="how /api/explain draws its heat map")


class Error(BaseModel):
    error: str = Field(description="what was wrong, and the fix where there is one")


def _errors(*statuses: int) -> dict:
    """The OpenAPI ``responses`` of an endpoint's JSON errors."""
    meaning = {
        400: "a bad parameter (the message names it)",
        404: "no such image in the index",
        413: "the image is larger than the pixel limit",
        503: "the server is busy with requests of this kind; try again (Retry-After says when)",
    }
    return {status: {"model": Error, "description": meaning[status]} for status in statuses}


# the parameters are read as text and parsed by clipforge.search.bounds, so every mistake gets the page's own message
QUERY_HELP = f"the text to search for, 1 to {MAX_QUERY_CHARS} characters"
ROW_HELP = "a row of the index, 0 to the number of images - 1"
K_HELP = f"how many results, a whole number from 1 to {MAX_K}"
PICTURE = "image/jpeg"


# -- the application --------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, page: SearchPage, metrics: ServerMetrics) -> None:
    html = (files("clipforge.search") / "page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/api/info", response_model=Info, summary="The index and the model")
    def info() -> dict:
        return page.info()

    @app.get("/api/search", response_model=Results, summary="Images that match a text", responses=_errors(400, 503))
    def search(q: str = Query("", description=QUERY_HELP), k: str = Query(DEFAULT_K, description=K_HELP)) -> dict:
        return page.search(q, k)

    @app.get(
        "/api/similar",
        response_model=Results,
        summary="Images like an image of the index",
        description="The first result is the image itself (score 1).",
        responses=_errors(400, 404, 503),
    )
    def similar(row: str = Query("", description=ROW_HELP), k: str = Query(DEFAULT_K, description=K_HELP)) -> dict:
        return page.similar(row, k)

    @app.get(
        "/image/{key:path}",
        response_class=Response,
        summary="The thumbnail of a row",
        description=f"JPEG, at most {THUMBNAIL} px a side; any `key` that is not a row of the index is a 404.",
        responses={200: {"content": {PICTURE: {}}, "description": "the thumbnail"}, **_errors(404, 413, 503)},
    )
    def image(key: str = Path(description=ROW_HELP)) -> Response:
        return Response(page.thumbnail(key), media_type=PICTURE, headers={"Cache-Control": "max-age=3600"})

    @app.get(
        "/api/explain",
        response_class=Response,
        summary="Where a text matches an image",
        description=f"The image of `row` with the heat map of `q` on it: PNG, at most {THUMBNAIL} px a side.",
        responses={200: {"content": {"image/png": {}}, "description": "the overlay"}, **_errors(400, 404, 413, 503)},
    )
    def explain(row: str = Query("", description=ROW_HELP), q: str = Query("", description=QUERY_HELP)) -> Response:
        return Response(page.explain(row, q), media_type="image/png")

    @app.get(
        "/metrics",
        response_class=Response,
        summary="The server's figures for Prometheus",
        description="Requests by endpoint and status, a latency histogram, heavy requests in flight, dropped "
        "connections, the process's memory (RSS) and CPU time: Prometheus's text format.",
        responses={200: {"content": {metrics.content_type: {}}, "description": "the exposition"}},
    )
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Retry-After": "2"} if status == 503 else None)


async def _bad_request(request, error: BadRequest) -> JSONResponse:
    return _error(error.message, error.status)


async def _not_routed(request, error) -> JSONResponse:
    """Starlette's own 404 (no such route) and 405 (a method other than GET), as JSON like every other error."""
    if error.status_code == 404:
        return _error(f"no such page: {shorten(request.url.path)}", 404)
    if error.status_code == 405:
        return _error(f"{shorten(request.method)} is not allowed here: the page only answers GET", 405)
    return _error(str(error.detail), error.status_code)


async def _invalid(request, error) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())
    return _error(f"bad request: {problems}", 400)


async def _failure(request, error: Exception) -> JSONResponse:
    logger.exception("request %s failed", shorten(request.url.path, 200))
    return _error(f"the server failed on this request ({type(error).__name__})", 500)


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(HTTPException, _not_routed)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _failure)


def create_app(
    index: Index, explain_method: str = "auto", show_paths: bool = False, limits: ServerLimits | None = None
) -> FastAPI:
    """The FastAPI application serving ``index`` (opened with its checkpoint, for text queries and explain).

    ``show_paths``: show ids, paths and the checkpoint as stored (absolute) instead of relative to their
    source's folder. ``limits``: how much work runs at once (``ServerLimits()`` by default). ``app.state.page``
    answers, ``app.state.metrics`` counts.
    """
    page = SearchPage(index, explain_method, show_paths, limits or ServerLimits())
    metrics = ServerMetrics(page.gates, lambda: len(index))
    app = FastAPI(
        title="clipforge search",
        description="Search an embedding folder by text or by image, see where a text matches an image.",
        redoc_url=None,
    )
    app.state.page = page
    app.state.metrics = metrics
    app.add_middleware(MeasureRequests, metrics=metrics)
    _add_routes(app, page, metrics)
    _add_error_handlers(app)
    return app
