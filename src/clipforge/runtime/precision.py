"""The precision the towers compute in: ``fp32``, ``bf16`` or ``fp16`` autocast, and what ``auto`` picks.

``auto`` takes bf16 only where the device runs it natively *and* faster: a CUDA device with bf16 units, or a CPU
with AVX512-BF16 or AMX whose bf16 autocast a short timed probe finds clearly faster than float32. Elsewhere it
takes fp32: a CPU without bf16 units emulates it, and an AVX2-only EPYC ran a ViT-B/32 training step 7.4x slower
in bf16 autocast than in fp32. The probe runs once per CPU kind, torch version and ISA settings, and its result
is kept on disk (0.1-1 s, once; :mod:`clipforge.runtime.probes`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipforge.runtime.probes import cpu_flags, measured_once

logger = logging.getLogger("clipforge")

# a CPU's flags (/proc/cpuinfo) that name bf16 arithmetic units
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# the least probe speed-up (fp32 time / bf16 time) for which auto takes bf16: below it, fp32's exactness wins
MIN_BF16_SPEEDUP = 1.2


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in (``fp32``, ``bf16``, ``fp16``) and why, in words for the log."""

    precision: str
    reason: str


def measure_cpu_bf16_speedup(tokens: int = 128, width: int = 512, rounds: int = 5) -> float:
    """fp32 time / bf16-autocast time of a transformer MLP's forward and backward (``tokens`` x ``width`` ->
    4 ``width`` -> ``width``, GELU) on this CPU, the best of ``rounds`` alternating rounds each: > 1 when bf16 is
    faster. ~0.1 s with bf16 units, ~1 s where bf16 is emulated (once: see :func:`cpu_bf16_speedup`)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=generator, requires_grad=True)
    w1 = torch.randn(4 * width, width, generator=generator, requires_grad=True)
    w2 = torch.randn(width, 4 * width, generator=generator, requires_grad=True)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = F.linear(F.gelu(F.linear(x, w1)), w2)
        out.float().sum().backward()
        return time.perf_counter() - start

    step(False)  # warm-up: kernels chosen, memory touched
    fp32, first_bf16 = step(False), step(True)
    if first_bf16 > 4 * fp32:  # emulated bf16 (tens of times slower): no need to time it again
        return fp32 / first_bf16
    step(True)
    fp32 = min([fp32, *(step(False) for _ in range(rounds))])
    bf16 = min(step(True) for _ in range(rounds))
    return fp32 / bf16


def cpu_bf16_speedup() -> float:
    """:func:`measure_cpu_bf16_speedup`, measured once per CPU kind, torch version and ISA settings
    (:func:`clipforge.runtime.probes.measured_once`)."""
    return measured_once("bf16_speedup", measure_cpu_bf16_speedup)


def _cpu_choice(precision: str) -> PrecisionChoice:
    units = sorted(set(BF16_CPU_FLAGS) & cpu_flags())
    if precision == "auto" and not units:
        return PrecisionChoice("fp32", f"this CPU has no bf16 units ({' or '.join(BF16_CPU_FLAGS)})")
    speedup = cpu_bf16_speedup()
    if precision == "bf16":
        if speedup < 1:
            logger.warning(
                "precision bf16 on this CPU (%s): bf16 autocast ran %.1fx slower than fp32 in a probe here; "
                "use precision: auto (fp32 here) or fp32",
                "bf16 units: " + ", ".join(units) if units else "no bf16 units, emulated",
                1 / speedup,
            )
        return PrecisionChoice("bf16", "set by train.precision")
    if speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice("bf16", f"{', '.join(units)} units; bf16 autocast measured {speedup:.1f}x fp32's speed")
    return PrecisionChoice(
        "fp32",
        f"bf16 autocast measured {speedup:.2f}x fp32's speed on this CPU (auto takes bf16 from {MIN_BF16_SPEEDUP}x)",
    )


@functools.cache
def _resolve(precision: str, device_type: str, device_index: int | None) -> PrecisionChoice:
    if device_type == "cuda":
        if precision != "auto":
            return PrecisionChoice(precision, "set by train.precision")
        name = torch.cuda.get_device_name(device_index)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16", f"{name} computes bf16 natively")
        return PrecisionChoice("fp32", f"{name} has no native bf16 (fp16 with loss scaling: precision: fp16)")
    if device_type != "cpu":
        return PrecisionChoice("fp32" if precision == "auto" else precision, f"on {device_type}")
    if precision == "fp16":
        return PrecisionChoice("fp32", "fp16 autocast is a CUDA feature; on the CPU it computes in fp32")
    if precision == "fp32":
        return PrecisionChoice("fp32", "set by train.precision")
    choice = _cpu_choice(precision)
    if precision == "auto":
        logger.info("precision auto -> %s: %s", choice.precision, choice.reason)
    return choice


def resolve_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """The precision ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) means on ``device``, and why.

    ``auto``: bf16 on a CUDA device with native bf16, or on a CPU with bf16 units whose bf16 autocast the probe
    (:func:`cpu_bf16_speedup`) finds at least :data:`MIN_BF16_SPEEDUP` x faster than fp32; fp32 otherwise (logged
    once per process). An explicit ``bf16`` is kept, with a warning where the probe finds it slower than fp32.
    ``fp16`` on the CPU computes in fp32 (autocast's fp16 is a CUDA feature)."""
    return _resolve(precision, device.type, device.index)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the towers (``precision`` as :func:`resolve_precision` takes it); the loss is always
    computed in float32 outside it."""
    chosen = resolve_precision(precision, device).precision
    if chosen == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if chosen == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A model's own training precision for inference (``auto`` decided on this machine); on the CPU an fp16
    model runs in fp32."""
    return autocast_context(device, precision)
