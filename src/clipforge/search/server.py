"""The HTTP side of ``clipforge serve``: uvicorn with bounded connections, read deadlines, a socket bound here
(so a bind failure is a one-line error, not uvicorn's ``sys.exit``) and a heap that returns freed memory.

Bounds, all from :class:`~clipforge.search.app.ServerLimits` (HTTP/1.1 through uvicorn's h11 protocol, subclassed
by :class:`BoundedProtocol`):

- **Request headers**: a connection has ``header_timeout_s`` from the moment the server is ready for a request
  (the connection opened, or the previous answer was sent) until that request's headers are complete; bytes that
  trickle in do not extend it (a slowloris client sends one byte every few seconds). Past it the connection is
  dropped. Headers still incomplete past ``MAX_HEADER_BYTES`` get a JSON 400 (h11's limit; headers that arrive
  whole within one socket read, at most 256 KiB, are parsed), as does anything that is not HTTP/1.1.
- **Keep-alive**: an idle connection is closed after ``keep_alive_s`` without a byte (uvicorn's timer).
- **Slow readers**: a connection whose client stops reading an answer (the socket's buffer full) for
  ``send_timeout_s`` is dropped.
- **Connections**: at most ``connections`` open. A new one past the cap drops the open connection that has
  waited longest for request headers (a stalled client, never one mid-request); when every connection is busy
  with a request, the new one's request is answered a JSON 503 (``Retry-After``) and it is closed. Hence at most
  ``connections`` requests reach the page at once: h11 serves one request per connection at a time.
- **Heap**: the ``clipforge`` command sets glibc to keep freed blocks up to 32 MiB in the heap, which suits
  training; in a server, decoding a large image frees ~100 MB of pixel blocks (Pillow allocates 16 MiB blocks)
  that the heap would keep, in every thread's arena. :func:`return_freed_memory_to_the_system` fixes glibc's
  mmap and trim thresholds at ``SERVER_HEAP_THRESHOLD`` (4 MiB) instead; glibc's own default (a threshold that
  rises to the largest block freed) kept ~1 GB after 36 decodes of 36-megapixel images, 4 MiB kept 23 MB, and a
  ViT-B forward's activations (under 4 MiB each) still reuse warm heap memory; the training setting kept 3 GB in
  ``benchmarks/server_soak.py`` (results in benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from typing import Any

from clipforge.config import ConfigError
from clipforge.runtime import set_heap_thresholds
from clipforge.search.app import create_app
from clipforge.search.bounds import ServerLimits
from clipforge.search.index import Index
from clipforge.search.metrics import ServerMetrics

try:
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:
    raise ImportError("the web page needs FastAPI and uvicorn: pip install 'clipforge[serve]'") from None

logger = logging.getLogger("clipforge")

MAX_HEADER_BYTES = 16 * 1024  # h11's default limit on a request's line and headers, stated here
SERVER_HEAP_THRESHOLD = 4 * 2**20


def return_freed_memory_to_the_system() -> bool:
    """The server's heap: blocks over ``SERVER_HEAP_THRESHOLD`` are mapped from the system and given back when
    freed, and the heap's free top beyond it is trimmed, so a long-running server's memory falls back after a
    burst of large images (``clipforge.runtime.set_heap_thresholds``; measured in benchmarks/server_soak.py)."""
    return set_heap_thresholds(SERVER_HEAP_THRESHOLD, SERVER_HEAP_THRESHOLD)


# -- binding ----------------------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: any free port), not yet listening; ``ConfigError`` with the
    fix when it cannot be bound (port in use, no permission, not an address of this machine)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 <= port <= 65535:  # getaddrinfo would take 70000 as 70000 % 65536
        raise ConfigError(f"cannot serve on {where}: a port is a whole number from 1 to 65535 (0: any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConfigError(
            f"cannot serve on {where}: the host is not an address ({reason}); use 127.0.0.1 (this machine only) "
            "or 0.0.0.0 (every network interface)"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        # a restarted server binds at once, not after the old connections' TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        fixes = {
            errno.EADDRINUSE: "the port is in use (another server?): pick another with --port",
            errno.EACCES: "no permission (ports below 1024 need administrator rights): use a port from 1024 to "
            "65535 with --port",
            errno.EADDRNOTAVAIL: "the host is not an address of this machine: use 127.0.0.1 (this machine only) or "
            "0.0.0.0 (every network interface)",
        }
        raise ConfigError(f"cannot serve on {where}: {fixes.get(error.errno, error.strerror or str(error))}") from None
    return sock


# -- the protocol -----------------------------------------------------------------------------------------
def _json_response(status: int, reason: bytes, message: str, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    """h11 events of a complete JSON error answer that closes the connection."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"), *headers]
    return [h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body), h11.EndOfMessage()]


async def _busy(scope: dict, receive: Any, send: Any) -> None:
    """The answer to a request on a connection past the cap while every other connection is mid-request."""
    body = json.dumps({"error": "the server is busy with other connections; try again in a moment"}).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"2"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BoundedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the header deadline, the slow-reader deadline and the connection cap (see the
    module docstring). ``limits`` (and the application's ``metrics``, which count the connections it drops) are set on
    a subclass per server by :func:`protocol_for`."""

    limits: ServerLimits
    metrics: ServerMetrics | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # when the server became ready for this connection's next request; None while one is being served
        self.waiting_since: float | None = None
        self._header_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_for_request()
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._send_deadline = _cancel(self._send_deadline)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request's headers are complete: the app has it now
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._wait_for_request()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send_deadline = _cancel(self._send_deadline)
        self._send_deadline = self.loop.call_later(
            self.limits.send_timeout_s, self._drop, "stopped reading its answer", "slow reader"
        )

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_deadline = _cancel(self._send_deadline)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (or headers over ``MAX_HEADER_BYTES``): JSON like every other error."""
        message = f"bad request: not a valid HTTP/1.1 request, or its headers are over {MAX_HEADER_BYTES} bytes"
        for event in _json_response(400, b"Bad Request", message, []):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    # -- the bounds --------------------------------------------------------------------------------------
    def _wait_for_request(self) -> None:
        self._stop_waiting()
        self.waiting_since = time.monotonic()
        self._header_deadline = self.loop.call_later(
            self.limits.header_timeout_s, self._drop, "sent no complete request in time", "slow headers"
        )

    def _stop_waiting(self) -> None:
        self.waiting_since = None
        self._header_deadline = _cancel(self._header_deadline)

    def _drop(self, why: str, reason: str) -> None:
        """Close at once: ``abort`` discards what the client did not read (``close`` would wait for it); ``reason``:
        its label in ``clipforge_connections_dropped_total``."""
        self._count_drop(reason)
        self._stop_waiting()
        self._send_deadline = _cancel(self._send_deadline)
        logger.info("dropped a connection from %s: it %s", _client(self.client), why)
        self.transport.abort()
        self.connections.discard(self)  # now, not at connection_lost: the cap counts it free at once

    def _make_room(self) -> None:
        if len(self.connections) <= self.limits.connections:
            return
        waiting = [
            other
            for other in self.connections
            if other is not self and getattr(other, "waiting_since", None) is not None
        ]
        if waiting:
            min(waiting, key=lambda other: other.waiting_since)._drop(
                "had waited longest for its request when the server was full", "made room"
            )
        else:
            self._count_drop("refused")
            self.app = _busy  # every other connection is mid-request

    def _count_drop(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped.labels(reason).inc()


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _client(address: tuple[str, int] | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "a client"


def protocol_for(limits: ServerLimits, metrics: ServerMetrics | None = None) -> type[BoundedProtocol]:
    """The protocol class uvicorn builds per connection, with ``limits`` (and ``metrics`` to count its drops)."""
    return type("BoundedProtocol", (BoundedProtocol,), {"limits": limits, "metrics": metrics})


def make_server(app: Any, limits: ServerLimits, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for ``app`` with ``limits``; run it with ``server.run(sockets=[bind_socket(...)])``."""
    config = uvicorn.Config(
        app,
        http=protocol_for(limits, getattr(getattr(app, "state", None), "metrics", None)),
        ws="none",  # the page has no websocket
        lifespan="off",
        log_level=log_level,
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  (a float works: it goes to call_later)
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return uvicorn.Server(config)


def run(app: Any, sock: socket.socket, limits: ServerLimits) -> None:
    """Serve ``app`` on ``sock`` (from :func:`bind_socket`) with ``limits`` until interrupted, the heap set to
    return freed memory (:func:`return_freed_memory_to_the_system`)."""
    return_freed_memory_to_the_system()
    host, port = sock.getsockname()[:2]
    logger.info("serving the page on http://%s:%d (Ctrl-C to stop)", f"[{host}]" if ":" in host else host, port)
    make_server(app, limits).run(sockets=[sock])


def serve(
    directory: str,
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    device: str = "cpu",
    explain_method: str = "auto",
    show_paths: bool = False,
    limits: ServerLimits | None = None,
    weights: str = "raw",
) -> None:
    """Bind ``host``:``port``, open the index and run the page (``create_app``) until interrupted; ``weights``:
    the checkpoint's ``raw`` weights or their moving average (``ema``).

    ``ConfigError`` when the address cannot be bound (a port in use, no permission, not this machine's address),
    before the model is loaded."""
    limits = limits or ServerLimits()
    sock = bind_socket(host, port)  # first: a port in use is reported before the model loads
    try:
        app = create_app(
            Index.load(directory, checkpoint, backend=backend, device=device, weights=weights),
            explain_method,
            show_paths,
            limits,
        )
    except BaseException:
        sock.close()
        raise
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can search the index", host)
    run(app, sock, limits)
