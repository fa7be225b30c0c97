"""The web page, embedding and search under bad input, large images, load, interruption and a second writer:
a 4xx JSON error and never a 500, bounded memory and waiting, no server path shown, no work lost, no row twice."""

from __future__ import annotations

import inspect
import io
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.cli import build_parser, main
from clipforge.data import base as data_base
from clipforge.data.base import ImageTooLargeError
from clipforge.interop.load import load_checkpoint
from clipforge.search import embed as embed_module
from clipforge.search.embed import embed_images
from clipforge.search.faiss_loader import import_faiss
from clipforge.search.index import Index
from clipforge.search.store import EmbeddingStore
from tests.conftest import another_writer

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from clipforge.search import page as page_module  # noqa: E402
from clipforge.search.app import create_app  # noqa: E402
from clipforge.search.bounds import ServerLimits  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint[0])


@pytest.fixture(scope="module")
def index(tiny_checkpoint, loaded, tmp_path_factory) -> Index:
    checkpoint, images = tiny_checkpoint
    folder = tmp_path_factory.mktemp("hardening") / "emb"
    embed_images(loaded, checkpoint, images, folder, progress=False)
    return Index.load(folder, loaded)


@pytest.fixture(scope="module")
def client(index: Index) -> TestClient:
    return TestClient(create_app(index), raise_server_exceptions=False)


def fast_limits() -> ServerLimits:
    return ServerLimits(heavy_wait_s=0.05, image_wait_s=0.05, model_wait_s=0.05)


# -- every bad request is a 4xx JSON error ----------------------------------------------------------------
MANY_DIGITS = "9" * 5000


@pytest.mark.parametrize(
    ("method", "url", "status", "message"),
    [
        ("GET", "/image/%C2%B2", 404, "no image"),  # "²".isdigit() is True, int("²") fails
        ("GET", f"/image/{MANY_DIGITS}", 404, "no image"),  # int() refuses over 4300 digits
        ("GET", "/image/-1", 404, "no image"),
        ("GET", "/image/0.5", 404, "no image"),
        ("GET", "/api/similar?row=%C2%B2", 404, "no image"),
        ("GET", f"/api/similar?row={MANY_DIGITS}", 404, "no image"),
        ("GET", "/api/similar?row=-3", 404, "no image"),
        ("GET", "/api/similar?row=abc", 404, "no image"),
        ("GET", "/api/similar?row=1&k=-3", 400, "k=-3"),
        ("GET", "/api/similar?row=1&k=101", 400, "k=101"),
        ("GET", "/api/search?q=red&k=%C2%B2", 400, "bad request"),
        ("GET", f"/api/search?q=red&k={MANY_DIGITS}", 400, "bad request"),
        ("GET", "/api/search?q=red&k=1.5", 400, "bad request"),
        ("GET", "/api/search?q=red&k=", 400, "bad request"),
        ("GET", "/api/search?q=" + "a" * 1001, 400, "at most 1000"),
        ("GET", f"/api/explain?row={MANY_DIGITS}&q=red", 404, "no image"),
        ("GET", "/api/explain?row=%C2%B2&q=red", 404, "no image"),
        ("GET", "/no/such/page", 404, "no such page"),
        ("GET", "/api/", 404, "no such page"),
        ("POST", "/api/search?q=red", 405, "not allowed"),
        ("DELETE", "/image/0", 405, "not allowed"),
    ],
)
def test_malformed_requests_get_a_4xx_json_error(
    client: TestClient, method: str, url: str, status: int, message: str
) -> None:
    response = client.request(method, url)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error and "Traceback" not in response.text
    assert len(error) < 200  # a 5000-digit number is not echoed back whole


def test_a_good_request_still_works_after_bad_ones(client: TestClient) -> None:
    client.get("/image/%C2%B2")
    assert client.get("/image/3").status_code == 200
    assert len(client.get("/api/search", params={"q": "a red circle", "k": "100"}).json()["results"]) == 24


# -- no server paths unless asked -----------------------------------------------------------------------
def test_the_api_shows_paths_relative_to_the_embedded_folder(client: TestClient, index: Index, tiny_checkpoint) -> None:
    checkpoint, images = tiny_checkpoint
    info = client.get("/api/info").json()
    assert info["checkpoint"] == Path(checkpoint).name
    results = client.get("/api/search", params={"q": "a red circle", "k": 24}).json()["results"]
    names = {path.name for path in images.glob("*.png")}
    for hit in results:
        assert hit["id"] == hit["path"] == hit["name"] and hit["name"] in names
        assert str(images.parent) not in str(hit)
    shown = TestClient(create_app(index, show_paths=True), raise_server_exceptions=False)
    assert shown.get("/api/info").json()["checkpoint"] == os.path.abspath(checkpoint)
    hit = shown.get("/api/similar", params={"row": 0, "k": 1}).json()["results"][0]
    assert hit["id"] == hit["path"] == index.table.ids[0] and Path(hit["path"]).is_absolute()


def test_an_unreadable_image_error_does_not_name_the_server_folder(tiny_checkpoint, loaded, tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(images / "large_red_circle.png", folder / "nested" / "circle.png")
    shutil.copy(images / "small_blue_square.png", folder / "square.png")
    embed_images(loaded, checkpoint, folder, tmp_path / "emb", progress=False)
    index = Index.load(tmp_path / "emb", loaded)
    client = TestClient(create_app(index), raise_server_exceptions=False)
    row = index.table.ids.index(str((folder / "nested" / "circle.png").resolve()))
    assert client.get("/api/similar", params={"row": row, "k": 1}).json()["results"][0]["id"] == "nested/circle.png"
    (folder / "nested" / "circle.png").unlink()
    response = client.get(f"/image/{row}")
    assert response.status_code == 404
    error = response.json()["error"]
    assert "nested/circle.png" in error and "missing" in error and str(tmp_path) not in error


# -- large images: bounded memory -------------------------------------------------------------------------
def test_explain_downscales_a_large_image_before_the_heat_map(
    tiny_checkpoint, loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, _ = tiny_checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    big = Image.new("RGB", (3000, 2000), "white")
    big.paste((220, 30, 30), (1000, 500, 2000, 1500))
    big.save(folder / "big.png")
    embed_images(loaded, checkpoint, folder, tmp_path / "emb", progress=False)
    sizes = {}

    def spy(name, function):
        def wrapper(*args, **kwargs):
            image = args[1][0] if name == "explain" else args[0]
            sizes[name] = image.size
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(page_module, "explain_pairs", spy("explain", page_module.explain_pairs))
    monkeypatch.setattr(page_module, "overlay_heatmap", spy("overlay", page_module.overlay_heatmap))
    client = TestClient(create_app(Index.load(tmp_path / "emb", loaded)), raise_server_exceptions=False)
    response = client.get("/api/explain", params={"row": 0, "q": "a red square"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (512, 512)
    # the center square, downscaled before the model and the colouring: not the 2000 x 2000 crop
    assert sizes == {"explain": (512, 512), "overlay": (512, 512)}


def test_an_image_over_the_pixel_limit_is_a_413(index: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    client = TestClient(create_app(index), raise_server_exceptions=False)

    def too_large(row: int):
        raise ImageTooLargeError(f"{index.table.ids[row]}: 9000 x 9000 pixels is over the limit")

    monkeypatch.setattr(index, "load_image", too_large)
    for url in ("/image/2", "/api/explain?row=2&q=red"):
        response = client.get(url)
        assert response.status_code == 413 and "larger than 40,000,000 pixels" in response.json()["error"]
    monkeypatch.undo()
    # through the real decoder, which refuses before decoding (a limit below the 32 x 32 images)
    monkeypatch.setattr(data_base, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    for url in ("/image/2", "/api/explain?row=2&q=red"):
        assert client.get(url).status_code == 413
    monkeypatch.undo()
    # a source that decodes without the check is caught after decoding
    monkeypatch.setattr(page_module, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    response = client.get("/image/2")
    assert response.status_code == 413 and "larger than 1,023 pixels" in response.json()["error"]
    monkeypatch.setattr(page_module, "MAX_IMAGE_PIXELS", 32 * 32)
    assert client.get("/image/2").status_code == 200


# -- load: bounded concurrency and waiting ---------------------------------------------------------------
def test_busy_heavy_requests_wait_a_bounded_time_then_get_a_503(index: Index) -> None:
    app = create_app(index, limits=fast_limits())
    client = TestClient(app, raise_server_exceptions=False)
    page = app.state.page
    with page.heavy.enter(), page.heavy.enter():  # two explains in progress: the limit
        response = client.get("/api/explain", params={"row": 0, "q": "red"})
        assert response.status_code == 503 and "busy" in response.json()["error"]
        assert response.headers["retry-after"] == "2"
        assert client.get("/image/0").status_code == 200  # thumbnails have their own slots
    assert client.get("/api/explain", params={"row": 0, "q": "red"}).status_code == 200
    with page.model.enter():  # a model call in progress
        assert client.get("/api/search", params={"q": "red"}).status_code == 503
    with page.images.enter(), page.images.enter(), page.images.enter(), page.images.enter():
        assert client.get("/image/0").status_code == 503
    assert client.get("/api/search", params={"q": "red"}).status_code == 200


# -- embedding: one writer, little lost ---------------------------------------------------------------------
def test_a_second_embed_into_the_same_folder_fails_at_once(
    tiny_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, images = tiny_checkpoint
    out = tmp_path / "emb"
    argv = ["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)]
    with another_writer(out, "embed") as pid:  # another run is writing there
        assert main([*argv, "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clipforge embed: error: ") and f"another process (pid {pid}, clipforge embed)" in error
    assert "Traceback" not in error
    assert [path.name for path in out.iterdir()] == [".clipforge.lock"]  # nothing written
    assert main(argv) == 0
    ids = EmbeddingStore(out).table("images").ids
    assert len(ids) == len(set(ids)) == 24


def test_an_interrupted_embed_keeps_its_finished_parts_and_a_rerun_completes(
    tiny_checkpoint, loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, images = tiny_checkpoint
    assert build_parser().parse_args(["embed", "--checkpoint", "c", "--out", "o"]).flush_every == 256
    assert inspect.signature(embed_images).parameters["chunk_size"].default == 256
    out = tmp_path / "emb"
    argv = ["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--flush-every", "4"]
    encode = embed_module.encode_source_images
    seen = {"images": 0}

    def interrupt_after_ten(model, source, *args, **kwargs):
        seen["images"] += len(source)
        if seen["images"] > 10:
            raise KeyboardInterrupt  # the user presses Ctrl-C while the third part is being embedded
        return encode(model, source, *args, **kwargs)

    monkeypatch.setattr(embed_module, "encode_source_images", interrupt_after_ten)
    assert main(argv) == 130  # one line ("interrupted"), the shell's code for Ctrl-C, no traceback
    assert EmbeddingStore(out).count("images") == 8  # two parts of four, committed
    # what a crash between writing a part's embeddings and its table, or inside a merge, leaves behind
    np.save(out / "images" / "part-000050.npy", np.zeros((4, 32), np.float16))
    (out / "images" / "merge-000051.jsonl").write_text('{"id": "x"}\n')
    monkeypatch.setattr(embed_module, "encode_source_images", encode)
    assert main(argv) == 0
    store = EmbeddingStore(out)
    ids = store.table("images").ids
    assert len(ids) == len(set(ids)) == 24 and set(ids) == {str(p.resolve()) for p in images.glob("*.png")}
    # the leftovers are gone, and the stopped run's plan was taken up: its two committed chunks kept, the other four
    # embedded, and the folder holds the parts an uninterrupted run writes, bit for bit
    reference = embed_images(loaded, checkpoint, images, tmp_path / "ref", chunk_size=4, progress=False).store
    names = sorted(p.name for p in (out / "images").glob("*.*"))
    assert names == sorted(p.name for p in (reference / "images").glob("*.*"))
    assert names and all(name.startswith("part-000000-") for name in names)
    for name in names:
        assert (out / "images" / name).read_bytes() == (reference / "images" / name).read_bytes(), name


def test_flush_every_must_be_positive(tiny_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint, images = tiny_checkpoint
    out = tmp_path / "emb"
    argv = ["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--flush-every", "0"]) == 2
    assert "--flush-every 0 must be a positive number of images" in capsys.readouterr().err
    assert not out.exists()


# -- search --grid, faiss's loader ----------------------------------------------------------------------------
def test_search_grid_creates_its_folder(tiny_checkpoint, index: Index, tmp_path: Path) -> None:
    checkpoint, _ = tiny_checkpoint
    grid = tmp_path / "a" / "b" / "g.png"
    argv = ["search", "--index", str(index.store.root), "--checkpoint", str(checkpoint), "--query", "a red circle"]
    assert main([*argv, "--top", "3", "--grid", str(grid), "--device", "cpu"]) == 0
    assert grid.stat().st_size > 1000


FAKE_FAISS_LOADER = """
import logging
logger = logging.getLogger(__name__)
logger.info("Could not load library with AVX2 support due to:\\nModuleNotFoundError(\\"No module named 'faiss.swigfaiss_avx2'\\")")
logger.warning("a real problem of the loader")
"""


def test_faiss_loader_misses_are_silenced_but_its_warnings_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "faiss").mkdir()
    (tmp_path / "faiss" / "__init__.py").write_text("from .loader import *\n")
    (tmp_path / "faiss" / "loader.py").write_text(FAKE_FAISS_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "faiss"}
    for name in saved:
        del sys.modules[name]
    try:
        with caplog.at_level(logging.INFO):
            module = import_faiss()
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "faiss"]:
            del sys.modules[name]
        sys.modules.update(saved)
    assert Path(module.__file__).parent == tmp_path / "faiss"
    assert "swigfaiss_avx2" not in caplog.text and "a real problem of the loader" in caplog.text
    assert logging.getLogger("faiss.loader").level == logging.NOTSET


def test_serve_shows_paths_only_when_asked() -> None:
    parse = build_parser().parse_args
    assert parse(["serve", "--index", "emb", "--checkpoint", "last.pt"]).show_paths is False
    assert parse(["serve", "--index", "emb", "--checkpoint", "last.pt", "--show-paths"]).show_paths is True
