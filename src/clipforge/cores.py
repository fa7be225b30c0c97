"""How many CPU cores this process may use, and what that implies for loader processes and OpenMP's threads.

Light on purpose (no torch): the command line calls :func:`quiet_openmp_waits` before torch is imported, since
OpenMP reads its settings once, when torch's library loads.
"""

from __future__ import annotations

import math
import os
import time
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
# they spin on cores the laggards need: EfficientNet-Lite0 at 224 px (the demo's feature cache) fell from 95 to
# 6.6 images/s with 2 threads on 2 cores beside one busy process (benchmarks/README.md, "Shared machine"). A short
# spin keeps the quiet speed (a wake-up costs microseconds, and small forwards have many of them) but still held
# only 22% beside a busy process; sleeping at once (OMP_WAIT_POLICY=PASSIVE) held 62%, and cost 14% when quiet.
# So the wait policy is chosen by what the machine is doing when the command starts.
OPENMP_SPIN_COUNT = "10000"
# other processes' load (in cores) on this process's cores above which OpenMP's threads sleep at once: torch
# starts one thread per core, so any core another process keeps busy is one its threads contend for
BUSY_CORES = 0.5
# how long the load is sampled (/proc/stat counts in 10 ms ticks: 0.1 s of one busy core is 10 ticks)
LOAD_SAMPLE_SECONDS = 0.1


def _busy_ticks(cpus: set[int]) -> int | None:
    """Non-idle clock ticks since boot of the CPUs ``cpus`` (user, nice, system, irq, softirq, steal), from
    Linux's ``/proc/stat``; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or not fields[0][3:].isdigit():
            continue
        if int(fields[0][3:]) in cpus and len(fields) >= 9:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
            busy += user + nice + system + irq + softirq + steal
    return busy


def other_load(seconds: float = LOAD_SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores other processes kept busy over the next ``seconds`` (0 = idle machine,
    1.0 = one core's worth), this process's own CPU time left out; None where it cannot tell (not Linux, or a
    CPU quota narrower than the cores this process may run on, where the cores' load is not its to share)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    if available_cores() < len(cpus) or not hasattr(os, "sysconf"):
        return None
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    before, own_before, start = _busy_ticks(cpus), _own_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    after, own_after, elapsed = _busy_ticks(cpus), _own_cpu_seconds(), time.monotonic() - start
    if before is None or after is None or elapsed <= 0:
        return None
    busy = (after - before) / ticks_per_second - (own_after - own_before)
    return max(0.0, busy / elapsed)


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def quiet_openmp_waits(load: float | None = None) -> bool:
    """Choose how OpenMP's waiting threads use their core, unless the user set a wait policy; call before torch is
    imported (it has no effect after). With other processes busy on this process's cores (``load``, by default
    :func:`other_load`, at least :data:`BUSY_CORES`) they sleep at once (``OMP_WAIT_POLICY=PASSIVE``,
    ``KMP_BLOCKTIME=0`` for Intel's runtime); otherwise they spin briefly (``GOMP_SPINCOUNT``,
    ``KMP_BLOCKTIME=1`` ms). Load that starts after this call finds the short spin. Returns whether it set
    anything."""
    if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & set(os.environ):
        return False
    load = other_load() if load is None else load
    if load is not None and load >= BUSY_CORES:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["KMP_BLOCKTIME"] = "0"
    else:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
        os.environ["KMP_BLOCKTIME"] = "1"  # milliseconds
    return True
