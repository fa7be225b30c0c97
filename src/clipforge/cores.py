"""How many CPU cores this process may use, and what that implies for loader processes and OpenMP's threads.

Light on purpose (no torch): the command line calls :func:`quiet_openmp_waits` before torch is imported, since
OpenMP reads its settings once, when torch's library loads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# the most loader processes `num_workers: auto` starts in one process (more only queue decoded batches)
MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a scheduler's cpuset), further limited
    by a cgroup v2 CPU quota (a container's ``--cpus``), at least 1. ``os.cpu_count()`` counts the machine's."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """cgroup v2's ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) as cores, None when unlimited or absent."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def auto_workers() -> int:
    """``num_workers: auto``: half of this process's share of the cores, at most :data:`MAX_AUTO_WORKERS`.

    The share divides :func:`available_cores` by the processes torchrun starts on this machine
    (``LOCAL_WORLD_SIZE``). Half: the other half computes (on a CPU the training step itself needs the cores;
    on a GPU the main process feeds the device). 2 cores -> 1 worker, 1 core -> 0 (decode in the main process),
    16 cores -> 8."""
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return min(MAX_AUTO_WORKERS, available_cores() // local_processes // 2)


def resolve_workers(num_workers: int | str) -> int:
    """A config's ``num_workers``: the number itself, or :func:`auto_workers` for ``"auto"``."""
    return auto_workers() if num_workers == "auto" else int(num_workers)


# OpenMP threads that finish their share of an op first wait for the others at a barrier, spinning on a core for
# a while (libgomp: 300,000 spins by default) before they sleep. On a machine whose cores other processes use,
# they spin on cores the laggards need: EfficientNet-Lite0 at 224 px (the demo's feature cache) fell from 72 to
# 11.5 images/s with 2 threads on 2 cores beside one busy process; with a short spin it ran 43-67 (see
# benchmarks/README.md, "Shared machine"). A short spin keeps most of the quiet speed: a wake-up costs microseconds.
OPENMP_SPIN_COUNT = "10000"


def quiet_openmp_waits() -> bool:
    """Make OpenMP's waiting threads yield their core soon (``GOMP_SPINCOUNT``, and ``KMP_BLOCKTIME`` for Intel's
    runtime) unless the user set a wait policy; call before torch is imported (it has no effect after).
    Returns whether it set anything."""
    if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & set(os.environ):
        return False
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    os.environ["KMP_BLOCKTIME"] = "1"  # milliseconds
    return True
