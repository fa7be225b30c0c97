"""``clipforge serve``: a small web page over an embedding folder (FastAPI + uvicorn, the ``serve`` extra).

Endpoints (all answers to bad input are JSON ``{"error": message}`` with a 4xx status, never a traceback):

- ``GET /``: the page (``page.html``): a search box, a grid of results with scores, click an image for
  similar images, and a toggle that overlays the heat map of the query text.
- ``GET /api/search?q=TEXT&k=12``: text -> images; ``GET /api/similar?row=R&k=12``: image -> images.
- ``GET /image/{row}``: the image of a row of the index, re-encoded as JPEG (at most ``THUMBNAIL`` px). Only
  rows of the index are served: anything else in the path (``../../etc/passwd``, an absolute path, a file
  name) is a 404, so the server never opens a path that a request names.
- ``GET /api/explain?row=R&q=TEXT``: that image with the heat map of TEXT on it (PNG).
- ``GET /api/info``: the index size, the model and the explain method.

The server binds 127.0.0.1 unless told otherwise: the page has no authentication.
"""

from __future__ import annotations

import io
import logging
import threading
from importlib.resources import files

from PIL import Image

from clipforge.data.base import ImageLoadError
from clipforge.search.index import Index, SearchHit

logger = logging.getLogger("clipforge")

THUMBNAIL = 512
MAX_K = 100


def _fastapi():
    try:
        import fastapi  # noqa: F401
    except ImportError:
        raise ImportError("the web page needs FastAPI and uvicorn: pip install 'clipforge[serve]'") from None
    return fastapi


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def create_app(index: Index, explain_method: str = "auto"):
    """The FastAPI application serving ``index`` (opened with its checkpoint, for text queries and explain)."""
    fastapi = _fastapi()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    if index.loaded is None:
        raise ValueError("the web page needs the model: open the index with its checkpoint")
    if index.kind != "images":
        raise ValueError("the web page searches images: open the index with kind='images'")
    app = fastapi.FastAPI(title="clipforge search", docs_url=None, redoc_url=None, openapi_url=None)
    page = (files("clipforge.search") / "page.html").read_text(encoding="utf-8")
    # one model call at a time: requests run in a thread pool, and two CPU-bound passes would only thrash
    model_lock = threading.Lock()

    @app.exception_handler(_BadRequest)
    async def bad_request(request, error: _BadRequest):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

    @app.exception_handler(Exception)
    async def failure(request, error: Exception):
        logger.exception("request %s failed", request.url.path)
        return JSONResponse({"error": f"the server failed on this request ({type(error).__name__})"}, status_code=500)

    def row_of(text: str) -> int:
        if not text.isdigit() or int(text) >= len(index):
            raise _BadRequest(404, f"no image {text!r} in the index")
        return int(text)

    def check_k(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise _BadRequest(400, f"k={k} must be between 1 and {MAX_K}")
        return k

    def payload(hits: list[SearchHit]) -> dict:
        return {
            "results": [
                {
                    "rank": hit.rank,
                    "row": hit.row,
                    "name": (hit.path or hit.id).rsplit("/", 1)[-1],
                    "id": hit.id,
                    "score": round(hit.score, 5),
                    "image": f"/image/{hit.row}",
                }
                for hit in hits
            ]
        }

    @app.get("/", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/info")
    def info() -> dict:
        model = index.store.meta["model"]
        from clipforge.explain.heatmap import resolve_method

        return {
            "count": len(index),
            "checkpoint": model["checkpoint"],
            "step": model["step"],
            "backend": "faiss" if index.faiss is not None else "exact",
            "explain_method": resolve_method(index.loaded, explain_method),
        }

    @app.get("/api/search")
    def search(q: str = "", k: int = 12) -> dict:
        if not q.strip():
            raise _BadRequest(400, "the query is empty: type what the image should show")
        with model_lock:
            return payload(index.search(text=q, k=check_k(k)))

    @app.get("/api/similar")
    def similar(row: str = "", k: int = 12) -> dict:
        with model_lock:
            return payload(index.search(row=row_of(row), k=check_k(k)))

    def load(row: int) -> Image.Image:
        try:
            return index.load_image(row)
        except ImageLoadError as error:
            raise _BadRequest(404, f"image {row} cannot be read now: {error}") from None

    @app.get("/image/{key:path}")
    def image(key: str) -> Response:
        picture = load(row_of(key))
        picture.thumbnail((THUMBNAIL, THUMBNAIL))
        return Response(_encode(picture, "JPEG"), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/explain")
    def explain(row: str = "", q: str = "") -> Response:
        from clipforge.explain.heatmap import explain as explain_pairs
        from clipforge.viz import overlay_heatmap

        if not q.strip():
            raise _BadRequest(400, "explain needs the query text")
        picture = load(row_of(row))
        with model_lock:
            explanation = explain_pairs(index.loaded, [picture], [q], explain_method)[0][0]
        overlay = overlay_heatmap(explanation.image, explanation.heatmap)
        overlay.thumbnail((THUMBNAIL, THUMBNAIL))
        return Response(_encode(overlay, "PNG"), media_type="image/png")

    return app


def serve(
    directory: str,
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    device: str = "cpu",
    explain_method: str = "auto",
) -> None:
    """Open the index and run the page with uvicorn until interrupted."""
    _fastapi()
    import uvicorn

    index = Index.load(directory, checkpoint, backend=backend, device=device)
    app = create_app(index, explain_method)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can search the index", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
