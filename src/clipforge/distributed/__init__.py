"""Several processes: process groups, the collectives that make the contrastive losses exact across processes.

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

Modules: ``groups`` (start/stop, host-side exchanges), ``collectives`` (gathers and ring hops with gradient),
``wrap`` (the model for training: gradient checkpointing, compile, DDP/FSDP2, full-weight state dicts).
"""

from clipforge.distributed.collectives import all_gather_with_grad, neighbour_exchange_with_grad
from clipforge.distributed.groups import (
    DistributedContext,
    all_reduce_sum,
    broadcast_object,
    close_distributed,
    gather_ints,
    init_distributed,
    is_distributed,
)

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
