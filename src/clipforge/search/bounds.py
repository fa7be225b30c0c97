"""What the web page takes on: its parameters, each parsed once (``parse_row``, ``parse_k``, ``parse_query``), and
how much work runs at once (``ServerLimits`` and the :class:`Gate` of each kind of work).

A row is 1 to 18 ASCII digits below the index size, ``k`` a whole number from 1 to ``MAX_K``, a query 1 to
``MAX_QUERY_CHARS`` characters; anything else is a :class:`BadRequest` with its status (404 for a row that is no
image of the index, 400 otherwise). A request that waits longer than its gate's limit is a 503.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

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


class BadRequest(Exception):
    """A request the page answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- parameters ------------------------------------------------------------------------------------------
def shorten(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters for a message (a 5000-digit row number is not echoed whole)."""
    return text if len(text) <= limit else text[:limit] + "..."


def parse_row(text: str, count: int) -> int:
    """A row of an index of ``count`` rows, from its decimal text; anything else is a 404 (no such image)."""
    if not _ROW.fullmatch(text) or int(text) >= count:
        raise BadRequest(404, f"no image {shorten(text)!r} in the index: rows are 0 to {count - 1}")
    return int(text)


def parse_k(text: str) -> int:
    """The number of results: a whole number from 1 to ``MAX_K`` (else 400)."""
    if not _WHOLE_NUMBER.fullmatch(text) or not 1 <= int(text) <= MAX_K:
        raise BadRequest(400, f"bad request: k={shorten(text)} must be a whole number from 1 to {MAX_K}")
    return int(text)


def parse_query(text: str, missing: str) -> str:
    """A query text: not blank (else 400 with ``missing``), at most ``MAX_QUERY_CHARS`` characters."""
    if not text.strip():
        raise BadRequest(400, missing)
    if len(text) > MAX_QUERY_CHARS:
        raise BadRequest(400, f"bad request: the query has {len(text)} characters; at most {MAX_QUERY_CHARS}")
    return text


# -- the server's state ----------------------------------------------------------------------------------
class Gate:
    """At most ``slots`` requests inside at once; one that cannot enter within ``wait_s`` gets a 503.

    ``inside`` (requests in it now) and ``refused`` (503s so far) are what ``/metrics`` reports of it."""

    def __init__(self, slots: int, wait_s: float, work: str) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._count = threading.Lock()
        self.wait_s = wait_s
        self.work = work
        self.inside = 0
        self.refused = 0

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            with self._count:
                self.refused += 1
            raise BadRequest(503, f"the server is busy with other {self.work}; try again in a moment")
        with self._count:
            self.inside += 1
        try:
            yield
        finally:
            with self._count:
                self.inside -= 1
            self._slots.release()
