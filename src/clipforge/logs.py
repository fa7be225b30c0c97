"""Other libraries' log lines held back where clipforge says what happens itself (one mechanism for all of them)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def quiet_loggers(names: Iterable[str], level: int) -> Iterator[None]:
    """Inside, the loggers ``names`` pass only records of ``level`` and above; their own levels are put back after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)
