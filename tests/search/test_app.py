"""The web page's endpoints through FastAPI's test client: results, errors as JSON, no path traversal."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from clipforge.cli import build_parser  # noqa: E402
from clipforge.interop.load import load_checkpoint  # noqa: E402
from clipforge.search.app import create_app  # noqa: E402
from clipforge.search.embed import embed_images  # noqa: E402
from clipforge.search.index import Index  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory) -> TestClient:
    checkpoint, images = tiny_checkpoint
    loaded = load_checkpoint(checkpoint)
    folder = tmp_path_factory.mktemp("app") / "emb"
    embed_images(loaded, checkpoint, images, folder, progress=False)
    return TestClient(create_app(Index.load(folder, loaded)), raise_server_exceptions=False)


def test_the_page_has_a_search_box(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert 'id="query"' in response.text and 'id="explain"' in response.text
    info = client.get("/api/info").json()
    assert info["count"] == 24 and info["explain_method"] == "attention-gradient"


def test_text_search_then_similar_images(client: TestClient) -> None:
    results = client.get("/api/search", params={"q": "a large red circle", "k": 5}).json()["results"]
    assert [hit["rank"] for hit in results] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False))
    first = results[0]
    assert first["image"] == f"/image/{first['row']}" and first["name"].endswith(".png")
    similar = client.get("/api/similar", params={"row": first["row"], "k": 3}).json()["results"]
    assert similar[0]["row"] == first["row"] and similar[0]["score"] == pytest.approx(1.0, abs=2e-3)
    picture = client.get(first["image"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(picture.content)).size == (32, 32)


def test_explain_overlays_the_heat_map(client: TestClient) -> None:
    response = client.get("/api/explain", params={"row": 0, "q": "a red circle"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    assert client.get("/api/explain", params={"row": 0, "q": ""}).status_code == 400


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("/api/search?q=", 400, "empty"),
        ("/api/search?q=%20%20", 400, "empty"),
        ("/api/search?q=red&k=0", 400, "k=0"),
        ("/api/search?q=red&k=lots", 400, "bad request"),
        ("/api/similar?row=999", 404, "no image"),
        ("/api/similar?row=-1", 404, "no image"),
        ("/api/similar", 404, "no image"),
        ("/api/explain?row=abc&q=red", 404, "no image"),
    ],
)
def test_bad_requests_get_a_message_not_a_traceback(client: TestClient, url: str, status: int, message: str) -> None:
    response = client.get(url)
    assert response.status_code == status
    assert message in response.json()["error"] and "Traceback" not in response.text


@pytest.mark.parametrize(
    "path",
    [
        "/image/../../etc/passwd",
        "/image/..%2F..%2Fetc%2Fpasswd",
        "/image/%2Fetc%2Fpasswd",
        "/image//etc/passwd",
        "/image/etc/passwd",
        "/image/24",
        "/image/%2E%2E/%2E%2E/etc/passwd",
        "/image/0%2F..%2F..%2Fetc%2Fpasswd",
        "/image/large_red_circle.png",
    ],
)
def test_the_image_endpoint_serves_only_rows_of_the_index(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "root:" not in response.text


def test_an_image_deleted_after_indexing_is_a_404_and_the_page_stays_up(tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("large_red_circle.png", "small_blue_square.png"):
        (folder / name).write_bytes((images / name).read_bytes())
    loaded = load_checkpoint(checkpoint)
    embed_images(loaded, checkpoint, folder, tmp_path / "emb", progress=False)
    client = TestClient(create_app(Index.load(tmp_path / "emb", loaded)), raise_server_exceptions=False)
    (folder / "large_red_circle.png").unlink()
    missing = next(
        h["row"] for h in client.get("/api/similar?row=0").json()["results"] if h["name"].startswith("large")
    )
    response = client.get(f"/image/{missing}")
    assert response.status_code == 404 and "missing" in response.json()["error"]
    assert client.get("/api/search", params={"q": "a circle"}).status_code == 200


def test_serve_binds_loopback_unless_told_otherwise() -> None:
    args = build_parser().parse_args(["serve", "--index", "emb", "--checkpoint", "last.pt"])
    assert args.host == "127.0.0.1"
