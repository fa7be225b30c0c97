"""Where and how a command computes: the device, the precision, loader processes, memory, random generators."""

from clipforge.runtime.device import (
    ignore_interrupt_signals,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from clipforge.runtime.memory import (
    CPU_FORWARD_PIXELS,
    HEAP_MMAP_THRESHOLD,
    HEAP_TRIM_THRESHOLD,
    cpu_images_per_forward,
    forward_in_cpu_chunks,
    keep_freed_memory_in_the_heap,
    set_heap_thresholds,
)
from clipforge.runtime.precision import PrecisionChoice, autocast_context, inference_autocast, resolve_precision
from clipforge.runtime.workers import WORKERS_PER_CORE, usable_workers

__all__ = [
    "CPU_FORWARD_PIXELS",
    "HEAP_MMAP_THRESHOLD",
    "HEAP_TRIM_THRESHOLD",
    "WORKERS_PER_CORE",
    "PrecisionChoice",
    "autocast_context",
    "cpu_images_per_forward",
    "forward_in_cpu_chunks",
    "ignore_interrupt_signals",
    "inference_autocast",
    "keep_freed_memory_in_the_heap",
    "resolve_device",
    "resolve_precision",
    "rng_state",
    "seed_everything",
    "set_heap_thresholds",
    "set_rng_state",
    "usable_workers",
]
