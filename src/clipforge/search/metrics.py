"""``GET /metrics`` of ``clipforge serve``: the server's figures in Prometheus's text format, through the standard
``prometheus_client`` library (the ``serve`` extra).

Each application has its own registry (two servers in one process, or a test's several apps, never share counts):

- ``clipforge_requests_total{endpoint, status}``: answered requests. ``endpoint`` is the route's template
  (``/api/search``, ``/image/{key}``), never the path a client sent (``unrouted`` for a path no route takes), so
  hostile paths cannot grow the number of series.
- ``clipforge_request_duration_seconds{endpoint}``: a latency histogram, from the request reaching the application to
  its answer's last byte handed to the server.
- ``clipforge_heavy_requests_in_flight{work}`` and ``clipforge_heavy_requests_refused_total{work}``: requests inside
  each gate now (queries, heat maps, images, large images: ``clipforge.search.bounds.Gate``) and the 503s each gave.
- ``clipforge_connections_dropped_total{reason}``: connections the HTTP side closed (``clipforge.search.server``): a
  client too slow with its headers or at reading, the oldest waiting one dropped for a newcomer, a newcomer refused.
- ``clipforge_index_rows``: the rows searched; and the library's process figures: ``process_resident_memory_bytes``
  (RSS), ``process_cpu_seconds_total``, ``process_open_fds``, ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.process_collector import ProcessCollector
except ImportError:
    raise ImportError("the web page's /metrics needs prometheus-client: pip install 'clipforge[serve]'") from None

from clipforge.search.bounds import Gate

# from 5 ms (a thumbnail from the page cache) to 30 s (an explain waiting for its gate, then running)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DROP_REASONS = ("slow headers", "slow reader", "made room", "refused")


class _GateCollector:
    """Reads the gates and the index size when Prometheus scrapes (nothing to update on the request path)."""

    def __init__(self, gates: Iterable[Gate], rows: Callable[[], int]) -> None:
        self.gates = tuple(gates)
        self.rows = rows

    def collect(self) -> Iterator[Any]:
        inside = GaugeMetricFamily(
            "clipforge_heavy_requests_in_flight", "Requests inside each gate of heavy work now", labels=["work"]
        )
        refused = CounterMetricFamily(
            "clipforge_heavy_requests_refused", "Requests each gate answered 503 after its wait", labels=["work"]
        )
        for gate in self.gates:
            inside.add_metric([gate.work], gate.inside)
            refused.add_metric([gate.work], gate.refused)
        yield inside
        yield refused
        yield GaugeMetricFamily("clipforge_index_rows", "Rows of the index the page searches", value=self.rows())


class ServerMetrics:
    """The registry of one application, its request counters, and the ASGI middleware that fills them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, gates: Iterable[Gate], rows: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "clipforge_requests", "Answered requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "clipforge_request_duration_seconds",
            "Time from a request reaching the application to its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.dropped = Counter(
            "clipforge_connections_dropped", "Connections the server closed", ["reason"], registry=self.registry
        )
        for reason in DROP_REASONS:  # every series from the start: a scrape shows 0, not nothing
            self.dropped.labels(reason)
        self.registry.register(_GateCollector(gates, rows))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes (RSS), CPU time, open files

    def exposition(self) -> bytes:
        """The text ``GET /metrics`` answers."""
        return generate_latest(self.registry)


class MeasureRequests:
    """ASGI middleware (``app.add_middleware(MeasureRequests, metrics=...)``) counting each HTTP request by route
    template and status, and timing it.

    A pure ASGI wrapper (not Starlette's ``BaseHTTPMiddleware``, which passes each answer through a queue): the
    status is read from the answer's start message, the route from the scope once routing has run. It sits inside
    the server-error layer, so an exception no handler takes passes through it: counted as the 500 it becomes."""

    def __init__(self, app: Callable, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_and_see(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            route = scope.get("route")  # its template: /image/{key}, whatever the path (bounded series)
            endpoint = getattr(route, "path_format", None) or getattr(route, "path", None) or "unrouted"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
