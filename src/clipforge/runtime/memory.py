"""Memory on the CPU: glibc's heap thresholds, and image-tower forwards in chunks that stay in the heap."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable

import torch

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
