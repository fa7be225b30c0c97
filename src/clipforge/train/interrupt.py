"""Stopping a run on SIGINT or SIGTERM at a step boundary, so that the saved state is exactly a step's.

While the loop runs, :func:`deferred_stop` replaces the two signals' handlers by one that only records the
request. The loop looks at it between steps: the step in progress (or the checkpoint being written) finishes,
a batch fetched after the request is not counted, every process agrees (the request travels with the per-step
gather of batch sizes, so all ranks stop after the same step), the run saves ``last.pt`` and
:class:`~clipforge.config.errors.Interrupted` ends the command with exit code 130 (SIGINT) or 143 (SIGTERM).
A second Ctrl-C stops at once (``KeyboardInterrupt``); the checkpoint on disk is then the last one written,
whole, as after ``kill -9``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """The signal that asked the run to stop (None: none did)."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


@contextlib.contextmanager
def deferred_stop() -> Iterator[StopRequest]:
    """Record SIGINT/SIGTERM in the yielded :class:`StopRequest` inside the block instead of acting on them.

    A second SIGINT raises ``KeyboardInterrupt`` as usual. Outside the main thread (signals can only be handled
    there) the block runs with the handlers unchanged and the request stays empty.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def record(signum: int, _frame: object) -> None:
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        request.signum = request.signum or signum

    previous = {number: signal.signal(number, record) for number in SIGNALS}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
