"""Process groups: start and stop them, and the small host-side exchanges between ranks (sizes, steps, objects)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

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


def _process_device(
    device: torch.device, local_rank: int, world_size: int, field: str = "train.device"
) -> torch.device:
    """One GPU per process: ``cuda`` (any index or none) becomes ``cuda:LOCAL_RANK`` when several processes run;
    ``field`` names the setting in the message (``train.device``, ``--device``)."""
    if device.type != "cuda" or world_size == 1:
        return device
    if device.index not in (None, local_rank):
        raise ValueError(
            f"{field}={device} in a {world_size}-process run: each process uses cuda:LOCAL_RANK; "
            f"set {field}=cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def init_distributed(
    device: torch.device, timeout_s: float | None = None, field: str = "train.device"
) -> DistributedContext:
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
        return DistributedContext(rank, world_size, local_rank, _process_device(device, local_rank, world_size, field))
    world_size = _environment_int("WORLD_SIZE") or 1
    if world_size == 1:
        return DistributedContext(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local_rank = _environment_int("RANK"), _environment_int("LOCAL_RANK")
    if rank is None:
        raise RuntimeError(f"WORLD_SIZE={world_size} but RANK is not set; launch with torchrun")
    local_rank = rank if local_rank is None else local_rank
    device = _process_device(device, local_rank, world_size, field)
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
