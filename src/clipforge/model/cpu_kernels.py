"""oneDNN's float32 linear kernels for the built-in transformer blocks on the CPU.

torch's float32 CPU matmul (``F.linear``, ``addmm``) goes through MKL. On the AMD EPYC development machine MKL
runs a (4160 x 256) @ (256 x 1024) linear - the tiny benchmark ViT's MLP at batch 64 - at ~170 GFLOP/s and
then adds the bias and runs GELU as separate passes over the output. oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend emits) ran it 2.3x faster,
fused with the bias, and 4.2x faster with GELU fused too; the backward products 2.3x (input gradient) and
1.25x (weight gradient) faster (benchmarks/README.md). Values agree with ``F.linear`` to float32 rounding.

* :func:`fused_linear`: inference (no autograd): linear + bias + optional GELU in one kernel.
* :func:`linear`: training too: an autograd function whose forward and backward products are oneDNN's.

Where a timed probe finds torch's own linear faster on this CPU and kernel set (:func:`_onednn_faster`, once per
machine), both are ``F.linear``.

Both apply only to float32 CPU tensors outside autocast and graph capture (torch.compile, torch.export and
ONNX, TorchScript keep the portable ``F.linear``); anywhere else they are ``F.linear``.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.runtime.probes import measured_once

# oneDNN's name for each fusable activation: (attr, algorithm) of torch.ops.mkldnn._linear_pointwise
ONEDNN_ACTIVATIONS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


@functools.cache
def _onednn_linear_available() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        with torch.inference_mode():
            op(torch.ones(1, 2), torch.ones(3, 2), torch.zeros(3), "none", [], "")
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without the op
        return False
    return torch.backends.mkldnn.is_available()


def measure_onednn_linear_speedup(tokens: int = 2048, width: int = 512, rounds: int = 5) -> float:
    """torch's float32 linear time / oneDNN's, forward and backward of a transformer MLP's first linear
    (``tokens`` x ``width`` -> 2 ``width``), the best of ``rounds`` alternating rounds each: > 1 when oneDNN is
    faster on this CPU and kernel set."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=generator, requires_grad=True)
    weight = torch.randn(2 * width, width, generator=generator, requires_grad=True)
    bias = torch.zeros(2 * width, requires_grad=True)

    def step(onednn: bool) -> float:
        start = time.perf_counter()
        out = _OneDNNLinear.apply(x, weight, bias) if onednn else F.linear(x, weight, bias)
        out.sum().backward()
        return time.perf_counter() - start

    for onednn in (False, True, False, True):  # warm-up: kernels chosen, memory touched
        step(onednn)
    times = {False: [], True: []}
    for _ in range(rounds):
        for onednn in (False, True):
            times[onednn].append(step(onednn))
    return min(times[False]) / min(times[True])


@functools.cache
def _onednn_faster() -> bool:
    """Whether oneDNN's linear beats torch's (MKL) here: measured once per CPU kind, torch version and ISA
    settings and kept (:func:`clipforge.runtime.probes.measured_once`). On the AVX-512 development CPUs oneDNN
    was 1.4-2.3x faster in training; with AVX2 dispatch forced, shapes split both ways (benchmarks/README.md)."""
    return measured_once("onednn_linear_speedup", measure_onednn_linear_speedup) >= 1.0


def _tracing() -> bool:
    """Inside torch.compile, torch.export (ONNX) or TorchScript tracing: graphs keep the portable ops."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not _tracing()
        and _onednn_linear_available()
        and _onednn_faster()
    )


def _product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """activation(x @ weight.T (+ bias)) in one oneDNN kernel; x (..., in), weight (out, in)."""
    attr, algorithm = ONEDNN_ACTIVATIONS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None
) -> torch.Tensor | None:
    """``activation(F.linear(x, weight, bias))`` in one oneDNN kernel (``activation``: None, ``gelu`` or
    ``gelu_tanh``), or None when it does not apply: autograd on, not float32 on the CPU, autocast, graph
    capture, or an activation oneDNN has no form for."""
    if torch.is_grad_enabled() or activation not in ONEDNN_ACTIVATIONS or not _applies(x, weight):
        return None
    return _product(x, weight, bias, activation)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN products: dx = dy W, dW = dy^T x (over every leading position), db = sum dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t().contiguous())  # (..., in): dy @ W
        if ctx.needs_input_grad[1]:
            grad_weight = _product(grad_rows.t(), x.reshape(-1, x.shape[-1]).t())  # (out, in): dy^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, with oneDNN's kernels forward and backward where they apply."""
    if not _applies(x, weight):
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled():
        return _product(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def apply_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(x)`` through :func:`linear` for a plain ``nn.Linear``; any other layer (a LoRA-adapted one, whose
    ``weight`` is only its base layer's) through its own forward."""
    if not is_plain_linear(layer):
        return layer(x)
    return linear(x, layer.weight, layer.bias)


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` computes ``x W^T + b`` from its ``weight`` and ``bias`` alone, so kernels may read them."""
    return isinstance(layer, nn.Linear)
