"""Where and how a run computes: the device, mixed precision, and the global random generators."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import random
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from clipforge.config import ConfigError
from clipforge.config.validation import check_device_name


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named
    (ConfigError naming ``field`` for anything else, or for a CUDA device this machine lacks)."""
    check_device_name(name, field)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}={name!r} but CUDA is not available here; use {field}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{field}={name!r} but this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the towers; the loss is always computed in float32 outside it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# loader processes per CPU core worth starting: decoding is CPU-bound, so more only queue up and take memory
# (PyTorch's DataLoader warns beyond one per core, too)
WORKERS_PER_CORE = 1


def usable_workers(requested: int, what: str = "data.num_workers") -> int:
    """``requested`` loader processes, or :data:`WORKERS_PER_CORE` per core of this machine when that is fewer
    (logged once): every loader's batches are the same whatever its number of workers, and a thousand forked
    processes would only exhaust the memory."""
    limit = WORKERS_PER_CORE * (os.cpu_count() or 1)
    if requested <= limit:
        return requested
    _warn_once(f"{what}={requested} on a machine with {os.cpu_count()} cores: starting {limit} loader processes")
    return limit


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("clipforge").warning(message)


def ignore_interrupt_signals(_worker_id: int = 0) -> None:
    """A loader worker's ``worker_init_fn``: ignore SIGINT and SIGTERM.

    Ctrl-C signals the terminal's whole process group, and a job scheduler's SIGTERM often does too; the main
    process then finishes its step, saves and stops, which needs its workers alive until it shuts them down
    (they exit with it: PyTorch's workers watch their parent).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators' state (Python, torch CPU, and CUDA on a CUDA device), for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def inference_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A model's own training precision for inference; fp16 autocast is a CUDA feature, so on the CPU an fp16
    model runs in fp32."""
    if precision == "fp16" and device.type != "cuda":
        precision = "fp32"
    return autocast_context(device, precision)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest mmap threshold on 64-bit systems
HEAP_TRIM_THRESHOLD = 2**30


def set_heap_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """On glibc, serve blocks up to ``mmap_threshold`` bytes from the heap (larger ones are mapped from the system
    and unmapped when freed) and give the heap's free top back to the system beyond ``trim_threshold``:
    ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)``. Fixing them also stops glibc's own rule of
    raising the mmap threshold to the largest block freed. Returns whether it was set (False elsewhere, or when
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are set: the user chose)."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@functools.cache
def keep_freed_memory_in_the_heap() -> bool:
    """:func:`set_heap_thresholds` for computing: freed blocks up to 32 MiB stay in the heap for reuse, 1 GiB of
    free heap is kept. Called by the ``clipforge`` command and by ``train``; once per process (a long-running
    server sets its own, ``clipforge.search.server``).

    Why: a CPU forward allocates each activation afresh (a ViT MLP's GELU input at batch 64: 17 MB). Above
    glibc's mmap threshold every such block is mapped from the system and page-faulted in, one zeroed page at
    a time, on every op of every step, and unmapped again when freed; on 2 cores that page-faulting cost the
    tiny benchmark ViT a third of its embedding time (benchmarks/README.md). Kept in the heap, a block is
    reused warm. The cost: up to 1 GiB of freed memory stays mapped to the process (its peak is unchanged).
    """
    return set_heap_thresholds(HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD)


# Pixels per image-tower forward on the CPU. Large CPU batches were slow with glibc's default allocator:
# activations above its mmap threshold are mapped fresh and page-faulted in, op after op (system time, not
# compute). Building the emoji cache with EfficientNet-Lite0 at 224 px on 2 cores, images/s by images per
# forward: 35 at 8 (1.6M page faults per 192 images), 48-55 at 4 (0.5-0.8M), 62-65 at 2 (none), 48 at 1 (none:
# too little work per op for two threads). With the heap kept (keep_freed_memory_in_the_heap), 2 / 4 / 8 gave
# 120 / 127 / 105: no size is clearly better, and 2 stays right where the setting is not made (a library caller,
# other allocators). Two 224 px images (four at 160 px) per forward; GPUs take the chunk.
CPU_FORWARD_PIXELS = 110_000


def cpu_images_per_forward(image_size: int) -> int:
    """Images per forward that keep a CPU forward below ``CPU_FORWARD_PIXELS`` (at least 1)."""
    return max(1, CPU_FORWARD_PIXELS // (image_size * image_size))


def forward_in_cpu_chunks(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``forward(images)`` as float32 rows, on ``device``: in chunks of :func:`cpu_images_per_forward` images on
    the CPU (the feature-cache builder, ``clipforge embed`` and evaluation all go through here), one call elsewhere."""
    step = cpu_images_per_forward(images.shape[-1]) if device.type == "cpu" else len(images)
    return torch.cat(
        [forward(images[start : start + step].to(device)).float() for start in range(0, len(images), step)]
    )
