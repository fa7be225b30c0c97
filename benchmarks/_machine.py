"""What the benchmarks need to know about the machine: CPU name and bf16 support, a measured matmul peak, the
GPU's data-sheet peak, and the peak memory of a stretch of code. Not a benchmark (``run_all.py`` skips ``_*``)."""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import torch

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
BF16_PEAK_TFLOPS = {"H200": 989.5, "H100 SXM": 989.5, "H100 80GB HBM3": 989.5, "H100 PCIe": 756.5, "A100": 312.0}


# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_bf16_report() -> tuple[bool, str]:
    """(whether bf16 autocast can run on this CPU, a sentence saying what supports it)."""
    flags: set[str] = set()
    try:
        flags = set(
            next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        )
    except (OSError, StopIteration):
        pass
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    onednn_bf16 = bool(probe()) if probe is not None else None
    matrix = torch.randn(64, 64)
    exact = matrix @ matrix
    try:
        error = ((matrix.bfloat16() @ matrix.bfloat16()).float() - exact).abs().max() / exact.abs().max()
        works = bool(error < 3e-2)  # bf16 keeps 8 bits of mantissa: ~1e-2 relative at most here
    except RuntimeError as exc:
        return False, f"bf16 matmul fails on this CPU ({exc}): bf16 rows are skipped"
    return works, (
        f"bf16 on this CPU: oneDNN available {torch.backends.mkldnn.is_available()}, oneDNN bf16 kernels "
        f"{onednn_bf16}, native instructions {', '.join(native) or 'none (bf16 is emulated: expect it slower)'}; "
        f"a 64x64 bf16 matmul {'agrees with fp32' if works else 'DISAGREES with fp32'} (relative error {float(error):.1e})"
    )


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """The best of ``repeats`` timed (size x size) @ (size x size) products, in GFLOP/s (2 size^3 each).

    On the CPU in float32 the best of two libraries: torch's matmul (MKL) and oneDNN's linear, which clipforge's
    blocks use (clipforge.model.cpu_kernels) and which ran ~2x faster than MKL on an AMD EPYC: the peak is what
    the hardware gives, not what one library reaches."""
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, generator=generator, device=device).to(dtype)
    right = torch.randn(size, size, generator=generator, device=device).to(dtype)
    sync = synchronizer(device)
    products = [lambda: left @ right]
    if device.type == "cpu" and dtype == torch.float32:
        from clipforge.model.cpu_kernels import _onednn_linear_available, _product

        if _onednn_linear_available():
            products.append(lambda: _product(left, right))
    best = math.inf
    with torch.no_grad():
        for product in products:
            product()  # the first call pays for kernel selection and thread start-up
            sync()
            for _ in range(repeats):
                started = time.perf_counter()
                product()
                sync()
                best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def datasheet_peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


class PeakMemory:
    """The peak memory of what runs between :meth:`start` and :meth:`stop`, and what was held at the start.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU (Linux): the kernel's
    peak-RSS mark (``VmHWM`` in /proc/self/status), reset to the current RSS by writing 5 to
    /proc/self/clear_refs; ``getrusage(RUSAGE_SELF).ru_maxrss`` would keep the import-time peak, and after
    fork + exec even the parent's. Elsewhere: ru_maxrss, with that caveat.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)"
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif _reset_peak_rss():
            self.method = "peak RSS (VmHWM, reset to the current RSS before the steps)"
            self.baseline = _proc_status_bytes("VmRSS")
        else:
            self.baseline = _ru_maxrss_bytes()

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM") if self.method.startswith("peak RSS (VmHWM") else _ru_maxrss_bytes()


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _proc_status_bytes(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def _ru_maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
