"""Process groups, and the collectives that make the contrastive losses exact across processes.

Launch with torchrun (``torchrun --nproc-per-node=N -m clipforge train ...``): it sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every process, and
:func:`init_distributed` reads them (none set: one process, no process group). CUDA runs use NCCL with one
GPU per process (``cuda:LOCAL_RANK``); CPU runs use gloo.

**Gradient scaling.** Rank ``r`` holds ``n_r`` of the ``N`` pairs of the global batch and computes its
share ``L_r`` of the global loss ``L = sum_r L_r`` (its rows against all columns, see ``clipforge.losses``).
The backward of :func:`all_gather_with_grad` (and of the ring exchange) sums every rank's gradient of the
gathered columns, so backpropagating ``L_r`` on every rank leaves ``dL/df_r`` on rank r's own features
``f_r``, and rank r's parameter gradient is ``g_r = dL/df_r * df_r/dθ + dL_r/dθ`` (the second term for the
logit scale/bias), with ``sum_r g_r = dL/dθ``. DDP and FSDP *average* gradients over the ``W`` ranks, so
every rank backpropagates ``W * L_r``: ``(1/W) sum_r W g_r = dL/dθ``, the single-process gradient of the
global batch. (With equal shards ``W * L_r`` is the mean over rank r's own rows: open_clip's "local loss".)

Batch sizes may differ between ranks (a rank that skipped unreadable images has fewer rows): the sizes are
exchanged first, over a gloo group on the CPU so that no GPU synchronisation is needed for them.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistributedContext",
    "all_gather_with_grad",
    "all_reduce_sum",
    "broadcast_object",
    "close_distributed",
    "gather_ints",
    "init_distributed",
    "is_distributed",
    "neighbour_exchange_with_grad",
]

# Long enough for rank 0 to evaluate or write a large checkpoint while the others wait in a collective;
# CLIPFORGE_DIST_TIMEOUT (seconds) lowers it, e.g. in tests, so that a lost rank fails the run instead of hanging it.
DEFAULT_TIMEOUT_S = 1800.0

_cpu_groups: dict[int, Any] = {}  # id(default group) -> a gloo group for host-side metadata


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its ``rank`` of ``world_size``, its ``local_rank`` on the node, its device.

    ``owns_group``: the process group was created by :func:`init_distributed` (and is destroyed by
    :func:`close_distributed`); False when there is none or when the caller created it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1


def is_distributed() -> bool:
    """A process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _environment_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _process_device(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    """One GPU per process: ``cuda`` (any index or none) becomes ``cuda:LOCAL_RANK`` when several processes run."""
    if device.type != "cuda" or world_size == 1:
        return device
    if device.index not in (None, local_rank):
        raise ValueError(
            f"train.device={device} in a {world_size}-process run: each process uses cuda:LOCAL_RANK; "
            "set train.device=cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device, timeout_s: float | None = None) -> DistributedContext:
    """The context of this process, initializing the process group from the torchrun environment.

    ``device`` is the run's device (``cpu`` or ``cuda``); with several processes on CUDA each takes
    ``cuda:LOCAL_RANK`` and NCCL is used, on the CPU gloo. A process group that already exists (created by a
    test or a launcher) is used as it is. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a
    single-process context and no group is created.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _environment_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
        return DistributedContext(rank, world_size, local_rank, _process_device(device, local_rank, world_size))
    world_size = _environment_int("WORLD_SIZE") or 1
    if world_size == 1:
        return DistributedContext(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local_rank = _environment_int("RANK"), _environment_int("LOCAL_RANK")
    if rank is None:
        raise RuntimeError(f"WORLD_SIZE={world_size} but RANK is not set; launch with torchrun")
    local_rank = rank if local_rank is None else local_rank
    device = _process_device(device, local_rank, world_size)
    if timeout_s is None:
        timeout_s = float(os.environ.get("CLIPFORGE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return DistributedContext(rank, world_size, local_rank, device, owns_group=True)


def close_distributed(context: DistributedContext, wait: bool = True) -> None:
    """Destroy the process group if ``context`` created it.

    ``wait``: first a barrier, so that no rank leaves while another still writes; False after an error, when
    the other ranks may never arrive.
    """
    if context.owns_group and dist.is_initialized():
        if wait:
            dist.barrier(group=_cpu_group())
        _cpu_groups.clear()
        dist.destroy_process_group()


def _cpu_group() -> Any:
    """A gloo group over all ranks for small host-side exchanges: the default one when it is gloo already.

    Created on first use, which every rank reaches at the same call (collective creation).
    """
    default = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return default
    key = id(default)
    if key not in _cpu_groups:
        _cpu_groups[key] = dist.new_group(backend="gloo")
    return _cpu_groups[key]


def gather_ints(value: int) -> list[int]:
    """Every rank's ``value``, in rank order (``[value]`` without a process group). Host-side only."""
    if not is_distributed():
        return [int(value)]
    mine = torch.tensor([int(value)], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine, group=_cpu_group())
    return [int(t.item()) for t in everyone]


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` (any picklable object) on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source, group=_cpu_group())
    return holder[0]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (no-op without a process group); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------------------------
# Differentiable collectives
# ----------------------------------------------------------------------------------------------
class _AllGather(torch.autograd.Function):
    """forward: the rows of every rank, concatenated in rank order; backward: sum over ranks, own slice."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: Sequence[int]) -> Tensor:
        ctx.sizes = list(sizes)
        ctx.rank = dist.get_rank()
        largest = max(ctx.sizes)
        # collectives need equal shapes: pad to the largest rank's rows, cut the padding off after
        padded = tensor.contiguous()
        if tensor.shape[0] < largest:
            padded = tensor.new_zeros((largest, *tensor.shape[1:]))
            padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in ctx.sizes]
        dist.all_gather(buffers, padded)
        return torch.cat([buffer[:rows] for buffer, rows in zip(buffers, ctx.sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # Every rank's loss used these columns: their total gradient is the sum over ranks. The clone also
        # makes the buffer ours, as all_reduce works in place.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """All ranks' ``tensor`` (rank r's has ``sizes[r]`` rows), concatenated in rank order: ``(sum(sizes), ...)``.

    Differentiable: the backward all-reduces (sums) the gradient of the concatenation and returns this
    rank's slice, i.e. the gradient of every rank's loss with respect to this rank's rows (module docstring).
    ``sizes`` defaults to equal sizes. Without a process group the tensor itself is returned.
    """
    if not is_distributed():
        return tensor
    if sizes is None:
        sizes = [tensor.shape[0]] * dist.get_world_size()
    if sizes[dist.get_rank()] != tensor.shape[0]:
        raise ValueError(f"sizes[{dist.get_rank()}]={sizes[dist.get_rank()]} but this rank has {tensor.shape[0]} rows")
    return _AllGather.apply(tensor, sizes)


def _send_receive(tensor: Tensor, send_to: int, receive_from: int, receive_shape: Sequence[int]) -> Tensor:
    received = tensor.new_empty(tuple(receive_shape))
    operations = [
        dist.P2POp(dist.isend, tensor.contiguous(), send_to),
        dist.P2POp(dist.irecv, received, receive_from),
    ]
    # posted together, so two ranks that send to each other (world size 2) cannot deadlock
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """forward: send to ``send_to``, receive from ``receive_from``; backward: the gradient goes back the same way."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, send_to: int, receive_from: int, receive_rows: int) -> Tensor:
        ctx.send_to, ctx.receive_from, ctx.sent_shape = send_to, receive_from, tuple(tensor.shape)
        return _send_receive(tensor, send_to, receive_from, (receive_rows, *tensor.shape[1:]))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # the rank we received from owns these rows: it gets their gradient; we get ours from whom we sent to
        return _send_receive(grad, ctx.receive_from, ctx.send_to, ctx.sent_shape), None, None, None


def neighbour_exchange_with_grad(tensor: Tensor, send_to: int, receive_from: int, receive_rows: int) -> Tensor:
    """Send ``tensor`` to rank ``send_to`` and return the ``receive_rows`` rows that ``receive_from`` sent us.

    One hop of a ring (``send_to = rank + 1``, ``receive_from = rank - 1``, mod world size): after ``k`` hops a
    rank holds rank ``r - k``'s tensor. Differentiable: the backward sends the received rows' gradient back
    to ``receive_from`` and receives the gradient of the sent rows from ``send_to``.
    """
    return _NeighbourExchange.apply(tensor, send_to, receive_from, receive_rows)
