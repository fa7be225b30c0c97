"""Differentiable collectives: gathers and ring hops whose backward routes each rank's gradient home.

See :mod:`clipforge.distributed` for how they make the contrastive losses exact across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from clipforge.distributed.groups import is_distributed


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
