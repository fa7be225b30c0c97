"""Short timed measurements of this machine, taken once and kept on disk: which kernels and which precision
run faster here (e.g. :func:`clipforge.runtime.precision.cpu_bf16_speedup`).

A figure is keyed by what decides it: the CPU's model name and flags, the torch version, the kernel set torch
dispatches to, and the variables that cap it (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ...), so an AVX2
dispatch forced on an AVX-512 machine is measured apart. The file is ``machine-probes.json`` under
``$CLIPFORGE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/clipforge``, i.e. ``~/.cache/clipforge``); when it cannot be
written (a read-only home) the figure is kept in the process only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from clipforge.io import OutputError, atomic_write_json

# the environment variables that change which CPU kernels torch dispatches to
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform module knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def machine_key() -> str:
    """What a probe's figure depends on, as a short digest."""
    isa = {name: os.environ.get(name, "") for name in ISA_VARIABLES}
    parts = [cpu_name(), " ".join(sorted(cpu_flags())), torch.__version__, torch.backends.cpu.get_cpu_capability(), isa]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def probe_file() -> Path:
    """Where the figures are kept (see the module's docstring)."""
    root = os.environ.get("CLIPFORGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "clipforge"
    )
    return Path(root) / "machine-probes.json"


@functools.cache
def measured_once(name: str, measure: Callable[[], float]) -> float:
    """``measure()``'s figure for ``name`` on this machine: read from the probe file, else measured now (with
    autograd on and no autocast, whatever the caller's mode) and written there (and kept in this process either
    way)."""
    path, key = probe_file(), machine_key()
    try:
        figures = json.loads(path.read_text())
        return float(figures[key][name])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # The first call comes from wherever a process first needs the figure: often inside torch.no_grad(),
    # inference_mode() (an embed's first linear) or an autocast region. A probe times autograd and plain float32,
    # so it runs outside all of them.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        value = float(measure())
    with contextlib.suppress(OSError, OutputError):  # unwritable or full: the figure stays in this process
        try:
            figures = json.loads(path.read_text())
        except (OSError, ValueError):
            figures = {}
        figures = figures if isinstance(figures, dict) else {}
        entry = figures.get(key) if isinstance(figures.get(key), dict) else {}
        figures[key] = {**entry, "cpu": cpu_name(), "torch": torch.__version__, name: round(value, 3)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, figures, replace=True)
    return value
