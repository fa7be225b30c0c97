"""Loader processes: how many a machine starts for a config's ``num_workers``."""

from __future__ import annotations

import functools
import logging

from clipforge.cores import available_cores, resolve_workers

# loader processes per CPU core worth starting: decoding is CPU-bound, so more only queue up and take memory
# (PyTorch's DataLoader warns beyond one per core, too)
WORKERS_PER_CORE = 1


def usable_workers(requested: int | str, what: str = "data.num_workers") -> int:
    """The loader processes to start for ``requested`` (a number, or ``"auto"``: :func:`clipforge.cores.auto_workers`):
    at most :data:`WORKERS_PER_CORE` per core this process may use (logged once when fewer than asked): every
    loader's batches are the same whatever its number of workers, and a thousand forked processes would only
    exhaust the memory."""
    wanted = resolve_workers(requested)
    cores = available_cores()
    limit = WORKERS_PER_CORE * cores
    if wanted <= limit:
        return wanted
    _warn_once(f"{what}={wanted} with {cores} cores available: starting {limit} loader processes")
    return limit


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("clipforge").warning(message)
