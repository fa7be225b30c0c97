"""The real server on loopback under hostile clients: stalled and trickling requests are dropped, the page still
answers while they are open, idle and non-reading clients are closed, a full server answers a JSON 503, broken
HTTP a JSON 400; a bad port or an address that cannot be bound is one line and exit code 2; JPEGs decode reduced.

Timeouts here are short (about a second) and every wait for the server is generous (15 s): the machine may be a
loaded 2-core one, so nothing asserts how fast the server was, only that it did what it must.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from clipforge.cli import main  # noqa: E402
from clipforge.interop.load import load_checkpoint  # noqa: E402
from clipforge.search import page as page_module  # noqa: E402
from clipforge.search.app import create_app  # noqa: E402
from clipforge.search.bounds import ServerLimits  # noqa: E402
from clipforge.search.embed import embed_images  # noqa: E402
from clipforge.search.index import Index  # noqa: E402
from clipforge.search.page import decode_reduced  # noqa: E402
from clipforge.search.server import bind_socket, make_server  # noqa: E402

WAIT_S = 15.0  # the most any step waits for the server: generous on a loaded machine
PARTIAL = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"  # headers never finished
SHORT = ServerLimits(connections=8, header_timeout_s=1.0, keep_alive_s=1.0, send_timeout_s=1.0)


@pytest.fixture(scope="module")
def embedded(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, embedding folder) of the 24 shapes."""
    checkpoint, images = tiny_checkpoint
    folder = tmp_path_factory.mktemp("server") / "emb"
    embed_images(load_checkpoint(checkpoint), checkpoint, images, folder, progress=False)
    return checkpoint, folder


@pytest.fixture(scope="module")
def index(embedded) -> Index:
    checkpoint, folder = embedded
    return Index.load(folder, load_checkpoint(checkpoint))


@contextlib.contextmanager
def running(index: Index, limits: ServerLimits) -> Iterator[tuple[int, object]]:
    """(port, uvicorn server) of the page served in a thread on 127.0.0.1, on a port the system picked."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(create_app(index, limits=limits), limits, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert eventually(lambda: server.started), "the server did not start"
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(WAIT_S)


def eventually(condition, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def connect(port: int, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    if first:
        sock.sendall(first)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (end of stream or reset) within ``WAIT_S``, reading what it sent."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def dropped_connections(port: int) -> dict[str, float]:
    """``clipforge_connections_dropped_total`` by reason, from the server's /metrics."""
    status, _, body = get(port, "/metrics")
    assert status == 200
    found = re.findall(r'^clipforge_connections_dropped_total\{reason="([^"]+)"\} (\S+)$', body.decode(), re.M)
    return {reason: float(value) for reason, value in found}


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


# -- slow and stalled clients -----------------------------------------------------------------------------
def test_stalled_and_trickling_requests_are_dropped_while_the_page_answers(index: Index) -> None:
    with running(index, SHORT) as (port, server):
        stalled = [connect(port, PARTIAL) for _ in range(SHORT.connections)]  # as many as the server holds
        assert eventually(lambda: len(server.server_state.connections) == SHORT.connections)
        # the server is full of clients that never finish their headers: a real request still gets its answer
        status, headers, body = get(port, "/api/info")
        assert status == 200 and json.loads(body)["count"] == 24
        # a client that sends a byte now and then is dropped all the same: bytes do not extend the deadline
        trickling = connect(port, PARTIAL)
        started = time.monotonic()
        while time.monotonic() - started < 3 * SHORT.header_timeout_s:
            try:
                trickling.sendall(b"x")
            except OSError:
                break  # dropped already
            time.sleep(0.2)
        assert closed_by_server(trickling)
        assert all(closed_by_server(sock) for sock in stalled)
        assert eventually(lambda: not server.server_state.connections)
        assert get(port, "/api/search?q=red")[0] == 200  # and the page is up afterwards
        for sock in [*stalled, trickling]:
            sock.close()
        # /metrics counts each of them: the one dropped to make room for the request, the others' deadlines
        dropped = dropped_connections(port)
        assert dropped["made room"] >= 1 and dropped["made room"] + dropped["slow headers"] == SHORT.connections + 1


def test_an_idle_keep_alive_connection_is_closed(index: Index) -> None:
    limits = ServerLimits(keep_alive_s=1.0, header_timeout_s=4 * WAIT_S)  # the keep-alive timer, not the deadline
    with running(index, limits) as (port, _):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        connection.request("GET", "/api/info")
        assert connection.getresponse().read() and connection.sock is not None  # kept alive for a next request
        assert closed_by_server(connection.sock)
        connection.close()


def test_a_client_that_stops_reading_is_dropped(index: Index) -> None:
    with running(index, SHORT) as (port, server):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answers back up at once
        sock.settimeout(WAIT_S)
        sock.connect(("127.0.0.1", port))
        # pipelined requests for the page (~5 KB each), never read: megabytes the server cannot hand over
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1500)
        assert eventually(lambda: server.server_state.total_requests > 0)
        assert eventually(lambda: not server.server_state.connections, timeout=2 * WAIT_S)
        assert server.server_state.total_requests < 1500  # dropped, not served to the end
        sock.close()
        assert get(port, "/api/info")[0] == 200
        assert dropped_connections(port)["slow reader"] == 1


def test_a_full_server_answers_a_json_503_and_serves_its_requests(index: Index) -> None:
    limits = ServerLimits(connections=2, header_timeout_s=WAIT_S, model_wait_s=2 * WAIT_S)
    with running(index, limits) as (port, server):
        page = server.config.app.state.page
        results: list[int] = []
        with page.model.enter():  # a model call in progress: the two searches below wait for it
            searches = [
                threading.Thread(target=lambda: results.append(get(port, "/api/search?q=red")[0]))
                for _ in range(limits.connections)
            ]
            for search in searches:
                search.start()
            assert eventually(lambda: len(server.server_state.tasks) == limits.connections)
            status, headers, body = get(port, "/api/info")  # a third connection: every one is mid-request
            assert status == 503 and headers["retry-after"] == "2" and headers["content-type"] == "application/json"
            assert "busy" in json.loads(body)["error"]
        for search in searches:
            search.join(WAIT_S)
        assert results == [200, 200]
        assert dropped_connections(port)["refused"] == 1


@pytest.mark.parametrize(
    "parts",
    [[b"NOT HTTP AT ALL\r\n\r\n"], [b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000, b"a\r\n\r\n"]],
    ids=["garbage", "headers-over-16-KiB"],
)
def test_a_broken_request_gets_a_json_400(index: Index, parts: list[bytes]) -> None:
    with running(index, SHORT) as (port, _):
        with connect(port) as sock:
            for part in parts:  # headers still incomplete past 16 KiB: h11's limit
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    sock.sendall(part)
                time.sleep(0.2)
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
        assert "bad request" in json.loads(body)["error"]


# -- the command line: a bad port or address is one line, exit code 2 --------------------------------------
def test_a_port_out_of_range_is_one_line_and_exit_2(embedded) -> None:
    checkpoint, folder = embedded
    argv = ["serve", "--index", str(folder), "--checkpoint", str(checkpoint), "--port", "70000"]
    done = subprocess.run([sys.executable, "-m", "clipforge", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        "clipforge serve: error: --port '70000' is not a port"
    )


def test_a_port_in_use_is_one_line_and_exit_2(embedded, capsys: pytest.CaptureFixture) -> None:
    checkpoint, folder = embedded
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--index", str(folder), "--checkpoint", str(checkpoint), "--port", port]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clipforge serve: error: ") and error.count("\n") == 1
    assert "the port is in use" in error and "--port" in error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "-1"], "'-1' is not a port"),
        (["--port", "http"], "'http' is not a port"),
        (["--host", "192.0.2.1", "--port", "0"], "not an address of this machine"),  # TEST-NET: never local
        (["--host", "no-such-host.invalid", "--port", "0"], "the host is not an address"),
    ],
)
def test_a_bad_port_or_host_is_a_user_error(
    embedded, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    checkpoint, folder = embedded
    assert main(["serve", "--index", str(folder), "--checkpoint", str(checkpoint), *options]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clipforge serve: error: ") and message in error and error.count("\n") == 1


# -- large images: JPEGs decode reduced ---------------------------------------------------------------------
def test_a_large_jpeg_decodes_reduced_and_other_images_wait_for_a_full_decode_slot(
    tiny_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, _ = tiny_checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    picture = Image.new("RGB", (4800, 3200), "white")
    picture.paste((220, 30, 30), (1600, 800, 3200, 2400))
    picture.save(folder / "big.jpg", quality=90)
    picture.resize((900, 600)).save(folder / "scan.png")
    reduced = decode_reduced(str(folder / "big.jpg"))
    assert reduced is not None and reduced.mode == "RGB"
    assert reduced.size == (1200, 800)  # 1/4 scale: the smallest that keeps both sides >= 512 px
    assert decode_reduced(str(folder / "scan.png")) is None  # not a JPEG: decoded whole, the usual way
    assert decode_reduced(str(folder / "missing.jpg")) is None  # left to the usual decoder and its message
    loaded = load_checkpoint(checkpoint)
    embed_images(loaded, checkpoint, folder, tmp_path / "emb", progress=False)
    index = Index.load(tmp_path / "emb", loaded)
    jpeg, png = (index.table.ids.index(str((folder / name).resolve())) for name in ("big.jpg", "scan.png"))
    app = create_app(index, limits=ServerLimits(image_wait_s=0.05))
    sizes = []
    original = page_module.overlay_input
    monkeypatch.setattr(
        page_module, "overlay_input", lambda image, *rest: sizes.append(image.size) or original(image, *rest)
    )
    client = TestClient(app, raise_server_exceptions=False)
    thumbnail = client.get(f"/image/{jpeg}")
    assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).size == (512, 341)
    explained = client.get("/api/explain", params={"row": jpeg, "q": "a red square"})
    assert explained.status_code == 200 and sizes == [(1200, 800)]
    assert Image.open(io.BytesIO(explained.content)).size == (512, 512)
    decodes = app.state.page.decodes
    with decodes.enter(), decodes.enter():  # two full-size decodes in progress: the limit
        busy = client.get(f"/image/{png}")
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
        assert client.get(f"/image/{jpeg}").status_code == 200  # a JPEG file needs no full-size slot
    assert client.get(f"/image/{png}").status_code == 200
