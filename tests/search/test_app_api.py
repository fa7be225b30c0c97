"""The web page's JSON API describes itself (OpenAPI at /openapi.json and /docs, the README's table of the same
endpoints) and reports itself (/metrics in Prometheus's text format: requests by route and status, latency, heavy
requests in flight and refused, dropped connections, the process's memory)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from clipforge.interop.load import load_checkpoint  # noqa: E402
from clipforge.search.app import create_app  # noqa: E402
from clipforge.search.bounds import ServerLimits  # noqa: E402
from clipforge.search.embed import embed_images  # noqa: E402
from clipforge.search.index import Index  # noqa: E402

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
ENDPOINTS = {"/api/search", "/api/similar", "/image/{key}", "/api/explain", "/api/info", "/metrics"}


@pytest.fixture(scope="module")
def index(tiny_checkpoint, tmp_path_factory) -> Index:
    checkpoint, images = tiny_checkpoint
    loaded = load_checkpoint(checkpoint)
    folder = tmp_path_factory.mktemp("api") / "emb"
    embed_images(loaded, checkpoint, images, folder, progress=False)
    return Index.load(folder, loaded)


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics scrape: (name, sorted labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_the_api_is_described_by_openapi_and_the_readme(index: Index) -> None:
    client = TestClient(create_app(index))
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == ENDPOINTS  # the page itself ("/") is not part of the API
    search = schema["paths"]["/api/search"]["get"]
    assert search["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Results"
    }
    assert {"400", "503"} <= set(search["responses"])
    assert search["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    parameters = {p["name"]: p for p in search["parameters"]}
    assert set(parameters) == {"q", "k"} and all(p["description"] for p in parameters.values())
    hit = schema["components"]["schemas"]["Hit"]["properties"]
    assert set(hit) == {"rank", "row", "name", "id", "path", "score", "image"} and all(
        field["description"] for field in hit.values()
    )
    assert "image/jpeg" in schema["paths"]["/image/{key}"]["get"]["responses"]["200"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text
    # an answer fits its model: what the page sends is what the description says
    results = client.get("/api/search", params={"q": "a red circle", "k": 3}).json()["results"]
    assert len(results) == 3 and set(results[0]) == set(hit)
    # the README's table lists the same endpoints
    section = README[README.index("### Web page") : README.index("## Pretrained towers")]
    listed = {
        re.sub(r"\{row\}", "{key}", cell.split("?")[0]) for cell in re.findall(r"^\| `([^`]+)` \|", section, re.M)
    }
    assert listed == ENDPOINTS


def test_metrics_count_requests_by_route_and_status(index: Index) -> None:
    client = TestClient(create_app(index), raise_server_exceptions=False)
    for _ in range(3):
        assert client.get("/api/search", params={"q": "a blue square"}).status_code == 200
    assert client.get("/api/similar", params={"row": "999"}).status_code == 404
    assert client.get("/image/0").status_code == 200
    assert client.get("/image/../../etc/passwd").status_code == 404
    for number in range(5):  # paths no route takes: one series, however many different ones are sent
        assert client.get(f"/no/such/page/{number}").status_code == 404
    scraped = samples(client)

    def requests(endpoint: str, status: str) -> float:
        return scraped.get(("clipforge_requests_total", (("endpoint", endpoint), ("status", status))), 0.0)

    assert requests("/api/search", "200") == 3 and requests("/api/similar", "404") == 1
    assert requests("/image/{key}", "200") == 1
    assert requests("unrouted", "404") + requests("/image/{key}", "404") == 6
    assert not any("passwd" in str(labels) or "no/such" in str(labels) for _, labels in scraped)
    count = scraped[("clipforge_request_duration_seconds_count", (("endpoint", "/api/search"),))]
    total = scraped[("clipforge_request_duration_seconds_sum", (("endpoint", "/api/search"),))]
    assert count == 3 and total > 0
    assert scraped[("clipforge_index_rows", ())] == 24
    assert scraped[("process_resident_memory_bytes", ())] > 10 * 2**20  # a Python with torch loaded
    assert scraped[("clipforge_connections_dropped_total", (("reason", "slow headers"),))] == 0
    assert samples(client)[("clipforge_requests_total", (("endpoint", "/metrics"), ("status", "200")))] == 1


def test_metrics_show_heavy_requests_in_flight_and_refused(index: Index) -> None:
    app = create_app(index, limits=ServerLimits(heavy_requests=1, heavy_wait_s=0.05))
    client = TestClient(app)
    held, release = threading.Event(), threading.Event()

    def hold_the_slot() -> None:
        with app.state.page.heavy.enter():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    try:
        assert held.wait(30)
        scraped = samples(client)
        assert scraped[("clipforge_heavy_requests_in_flight", (("work", "heat maps"),))] == 1
        assert scraped[("clipforge_heavy_requests_in_flight", (("work", "images"),))] == 0
        assert client.get("/api/explain", params={"row": 0, "q": "a red circle"}).status_code == 503
    finally:
        release.set()
        holder.join(30)
    scraped = samples(client)
    assert scraped[("clipforge_heavy_requests_in_flight", (("work", "heat maps"),))] == 0
    assert scraped[("clipforge_heavy_requests_refused_total", (("work", "heat maps"),))] == 1
    assert scraped[("clipforge_requests_total", (("endpoint", "/api/explain"), ("status", "503")))] == 1
