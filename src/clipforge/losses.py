"""Contrastive losses for two-tower image-text models: CLIP (softmax) and SigLIP (sigmoid).

Both losses take L2-normalized features ``X`` (images) and ``Y`` (texts), each ``(N, D)``, where row ``i``
of ``X`` and row ``i`` of ``Y`` are a matching pair, and the multiplier ``logit_scale`` = t (not its log,
open_clip's call shape): the logits are ``l_ij = t * <x_i, y_j>`` (+ ``b`` for SigLIP). A model learns
``log_logit_scale`` = log t and passes ``t = log_logit_scale.exp()`` (its forward's ``output.logit_scale``).
The scale is not clamped here; keeping it in range is the trainer's job.

Everything is computed in float32 whatever the input dtype (and with autocast switched off), because
log-sum-exp and softplus over large batches lose too much in bf16/fp16.

``chunk_size`` trades compute for memory: the losses are sums over rows, so they are summed over row
blocks of ``chunk_size`` rows, each block wrapped in activation checkpointing. Neither the forward nor the
backward pass then holds more than one ``(chunk_size, N)`` block of logits (peak extra memory
O(chunk_size * N) instead of O(N^2)); backward recomputes each block's logits once.

The losses are written as sums over "local rows against some columns" (``ClipLoss.partial_sum``,
``SigLipLoss.pair_sum``), and ``distributed=True`` reuses them across processes: each rank's rows against
columns gathered from (CLIP) or passed around a ring of (SigLIP) the other ranks. A rank's forward then
returns its *share* ``L_r`` of the loss of the global batch (``sum_r L_r`` = the single-process loss); see
``clipforge.distributed`` for why the trainer backpropagates ``world_size * L_r``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipforge.config import LossConfig
from clipforge.distributed import all_gather_with_grad, gather_ints, is_distributed, neighbour_exchange_with_grad

__all__ = ["LOSSES", "ClipLoss", "ContrastiveLoss", "SigLipLoss", "build_loss"]


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (or None for no chunking)")
    return chunk_size


def _check_features(rows: Tensor, columns: Tensor, rows_name: str, columns_name: str, same_shape: bool) -> None:
    """Raise a ValueError that names the tensors when they are not (N, D) / (M, D) feature matrices."""
    for name, tensor in ((rows_name, rows), (columns_name, columns)):
        if tensor.dim() != 2 or tensor.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (batch, embed_dim) matrix; got shape {tuple(tensor.shape)}")
    if same_shape and rows.shape != columns.shape:
        raise ValueError(
            f"{rows_name} and {columns_name} must have the same shape (batch, embed_dim), one row per pair; "
            f"got {tuple(rows.shape)} and {tuple(columns.shape)}"
        )
    if rows.shape[1] != columns.shape[1]:
        raise ValueError(
            f"{rows_name} and {columns_name} must share embed_dim; got {tuple(rows.shape)} and {tuple(columns.shape)}"
        )


def _as_scalar(value: Tensor | float, name: str, like: Tensor) -> Tensor:
    """A 0-dim float32 tensor on ``like``'s device (a float becomes a constant)."""
    value = torch.as_tensor(value, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element); got shape {tuple(value.shape)}")
    return value.float().reshape(())


def _float32_math(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off, so that float32 inputs really give float32 matmuls inside an autocast region."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _blockwise(
    block_fn: Callable[..., Tensor], rows: Tensor, columns: Tensor, *scalars: Tensor, chunk_size: int | None
) -> list[Tensor]:
    """``block_fn(rows[a:b], columns, *scalars)`` for consecutive row blocks of ``chunk_size`` rows.

    Each block runs under non-reentrant checkpointing when gradients are needed, so autograd keeps only its
    inputs (views of ``rows``/``columns``, already alive) and recomputes the ``(chunk_size, M)`` logits in
    backward, one block at a time. Without ``chunk_size`` the whole matrix is one plain block.
    """
    if chunk_size is None:
        return [block_fn(rows, columns, *scalars)]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, columns, *scalars))
    results = []
    for start in range(0, rows.shape[0], chunk_size):
        block = rows[start : start + chunk_size]
        if needs_grad:
            results.append(checkpoint(block_fn, block, columns, *scalars, use_reentrant=False))
        else:
            results.append(block_fn(block, columns, *scalars))
    return results


# ----------------------------------------------------------------------------------------------
# The shared base: one call shape, one place for chunking, the process-group switch and the checks
# ----------------------------------------------------------------------------------------------
class ContrastiveLoss(nn.Module):
    """A contrastive loss over a batch of N matching image-text pairs (the module docstring's conventions).

    ``loss(image_features, text_features, logit_scale, logit_bias=None)`` -> a 0-dim float32 tensor:

    * ``image_features``, ``text_features``: ``(N, D)``, L2-normalized, row i of each a matching pair;
    * ``logit_scale``: the multiplier t itself (a 0-dim tensor or a float), not its log;
    * ``logit_bias``: the additive logit bias ``b`` of losses that have one (``needs_bias``), else None.

    ``chunk_size``: sum the loss over row blocks of this many rows (peak extra memory O(chunk_size * N)).
    ``distributed``: with an initialized process group, return this rank's share of the loss of the
    global batch (the shares sum to the single-process loss). Subclasses hold only their maths:
    :meth:`local_loss` (one process) and :meth:`distributed_loss` (this rank's share).
    """

    #: whether the loss takes a logit bias: ``forward`` refuses a missing one, or one given to a loss without it
    needs_bias: bool = False
    #: what messages call the loss
    name: str = "this loss"

    def __init__(self, chunk_size: int | None = None, distributed: bool = False):
        super().__init__()
        self.chunk_size = _check_chunk_size(chunk_size)
        self.distributed = distributed

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, distributed={self.distributed}"

    def check_bias(self, logit_bias: Tensor | float | None) -> None:
        """Raise a ValueError when ``logit_bias`` is given to a loss without one, or missing from one with one."""
        if logit_bias is not None and not self.needs_bias:
            raise ValueError(f"{self.name} has no logit bias; a model with one trains with loss.kind=siglip")
        if logit_bias is None and self.needs_bias:
            raise ValueError(
                f"{self.name} needs logit_bias, the model's learned bias b (a model built with loss.kind=siglip "
                "has one)"
            )

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
    ) -> Tensor:
        """The loss (0-dim float32) of ``image_features``/``text_features`` ``(N, D)``, pairs on the diagonal.

        Distributed: this rank's share of the global batch's loss (the subclass docstring says how).
        """
        self.check_bias(logit_bias)
        # checked before any collective: a rank with a malformed batch must fail, not hang its peers
        _check_features(image_features, text_features, "image_features", "text_features", same_shape=True)
        if self.distributed and is_distributed():
            return self.distributed_loss(image_features, text_features, logit_scale, logit_bias)
        return self.local_loss(image_features, text_features, logit_scale, logit_bias)

    def local_loss(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None
    ) -> Tensor:
        """The loss of the batch held by this process."""
        raise NotImplementedError

    def distributed_loss(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None
    ) -> Tensor:
        """This rank's share of the loss of the global batch (every rank calls it together)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# CLIP: symmetric softmax cross-entropy
# ----------------------------------------------------------------------------------------------
def _row_logsumexp(rows: Tensor, columns: Tensor, scale: Tensor) -> Tensor:
    """``log sum_j exp(t * <r_i, c_j>)`` for every row i: ``(n,)``."""
    return torch.logsumexp(scale * (rows @ columns.T), dim=1)


class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE (CLIP) loss.

    With logits ``l_ij = t * <x_i, y_j>``, ``t = logit_scale``, and the matching pair on the diagonal:

        loss = 0.5 * (CE_rows + CE_cols)
        CE_rows = (1/N) sum_i [ log sum_j exp(l_ij) - l_ii ]     (each image picks its caption)
        CE_cols = (1/N) sum_j [ log sum_i exp(l_ij) - l_jj ]     (each caption picks its image)

    The column term is the row term with the roles of X and Y swapped, so both are computed as row
    log-sum-exps: of X against all of Y and of Y against all of X; the positives ``l_ii = t * <x_i, y_i>``
    need no matrix at all. With ``chunk_size`` the row log-sum-exps are taken over row blocks (see the
    module docstring); this costs a second ``N x N x D`` matmul compared with one shared logit matrix,
    the price of never holding that matrix.

    ``distributed=True`` (with an initialized process group): rank r's ``n_r`` pairs are the rows, the
    features of all ranks, gathered with gradient, the columns, and the forward returns rank r's share
    ``partial_sum(rows, all columns) / (2 N)``, ``N = sum_r n_r``: the "local loss" layout, ``n_r x N``
    logits per rank, never ``N x N``.
    """

    name = "the CLIP softmax loss"

    def partial_sum(
        self,
        image_features: Tensor,
        text_features: Tensor,
        image_columns: Tensor,
        text_columns: Tensor,
        logit_scale: Tensor,
    ) -> Tensor:
        """Un-normalized loss of some rows against some columns (float32 scalar).

        ``sum_i [ lse_j(t <x_i, Y_j>) - t <x_i, y_i> ] + sum_i [ lse_j(t <y_i, X_j>) - t <x_i, y_i> ]``
        over the pairs ``(x_i, y_i)`` of ``image_features``/``text_features`` (n rows), with ``Y``/``X`` =
        ``text_columns``/``image_columns`` (M rows, which must include the n rows' own partners). On one
        process the columns are the rows and the loss is ``0.5 * partial_sum / N``; a distributed loss
        passes its local pairs as rows and the gathered features as columns, and divides by ``2 * N_global``.
        """
        _check_features(image_features, text_features, "image_features", "text_features", same_shape=True)
        _check_features(image_columns, text_columns, "image_columns", "text_columns", same_shape=True)
        _check_features(image_features, image_columns, "image_features", "image_columns", same_shape=False)
        columns_are_rows = image_columns is image_features and text_columns is text_features
        with _float32_math(image_features.device):
            images, texts = image_features.float(), text_features.float()
            scale = _as_scalar(logit_scale, "logit_scale", images)  # t, the multiplier
            if self.chunk_size is None and columns_are_rows:
                # Single process, no chunking: one shared N x N matrix serves both directions.
                logits = scale * (images @ texts.T)  # (N, N)
                image_lse, text_lse = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)
            else:
                image_columns, text_columns = (
                    (images, texts) if columns_are_rows else (image_columns.float(), text_columns.float())
                )
                image_lse = torch.cat(
                    _blockwise(_row_logsumexp, images, text_columns, scale, chunk_size=self.chunk_size)
                )
                text_lse = torch.cat(
                    _blockwise(_row_logsumexp, texts, image_columns, scale, chunk_size=self.chunk_size)
                )
            positives = scale * (images * texts).sum(dim=1)  # (n,)
            # Subtract per row before summing: the sums of lse and of positives are both ~ n * t and nearly
            # cancel when the model is good, which would cost float32 digits.
            return ((image_lse - positives) + (text_lse - positives)).sum()

    def local_loss(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: None = None
    ) -> Tensor:
        """``partial_sum(X, Y, X, Y) / (2 N)``; the softmax loss has no bias (``logit_bias`` is None)."""
        total = self.partial_sum(image_features, text_features, image_features, text_features, logit_scale)
        return total / (2 * image_features.shape[0])

    def distributed_loss(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: None = None
    ) -> Tensor:
        """This rank's rows against every rank's columns, gathered with gradient: ``partial_sum / (2 N)``."""
        sizes = gather_ints(image_features.shape[0])
        image_columns = all_gather_with_grad(image_features, sizes)
        text_columns = all_gather_with_grad(text_features, sizes)
        total = self.partial_sum(image_features, text_features, image_columns, text_columns, logit_scale)
        return total / (2 * sum(sizes))


# ----------------------------------------------------------------------------------------------
# SigLIP: pairwise sigmoid
# ----------------------------------------------------------------------------------------------
def _row_softplus_sum(rows: Tensor, columns: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``sum_j softplus(t * <r_i, c_j> + b)`` for every row i: ``(n,)``."""
    return F.softplus(scale * (rows @ columns.T) + bias).sum(dim=1)


class SigLipLoss(ContrastiveLoss):
    """Sigmoid (SigLIP) loss over all N x N pairs, normalized by N as in the SigLIP paper.

        loss = -(1/N) sum_ij log sigmoid(z_ij * l_ij),   l_ij = t * <x_i, y_j> + b,   z_ij = 1 if i == j else -1

    with ``t = logit_scale`` and ``b = logit_bias``.

    Computed without a label matrix. Since ``-log sigmoid(u) = softplus(-u)``:

        off the diagonal (z = -1):  -log sigmoid(-l_ij) = softplus(l_ij)
        on the diagonal  (z = +1):  -log sigmoid(l_ii)  = softplus(-l_ii) = softplus(l_ii) - l_ii

    using ``softplus(-u) = log(1 + e^-u) = log(e^-u (e^u + 1)) = softplus(u) - u``. Summing both cases:

        N * loss = sum_ij softplus(l_ij) - sum_i l_ii

    The first term is a plain sum over all pairs, so it splits over row blocks of any size (``chunk_size``);
    the second needs only the N positive pairs. ``b`` (``logit_bias``) is the learned bias that offsets the
    N - 1 negatives per positive (the paper starts it at -10 with ``t = 10``).

    ``distributed=True`` (with an initialized process group) is the paper's chunked form: rank r sums its
    images against its own texts (the positives and the local negatives), then ``W - 1`` times passes the
    text block it holds to rank r + 1 and receives rank r - 1's (gradients flow back around the ring), and
    sums its images against each received block as negatives. It returns its share
    ``sum_s pair_sum(X_r, Y_s) / N``. The global ``N x N`` logits never exist: a rank computes ``n_r x n_s``
    blocks one at a time, which autograd keeps for the backward (``n_r x N`` in all, like CLIP's layout);
    with ``chunk_size`` only one ``chunk_size x n_s`` block is alive at a time.
    """

    needs_bias = True
    name = "the SigLIP sigmoid loss"

    def pair_sum(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        paired: bool = True,
    ) -> Tensor:
        """``sum_ij -log sigmoid(z_ij * l_ij)`` of ``image_features`` (n, D) against ``text_features`` (m, D).

        ``paired=True``: the two blocks hold the same samples in the same order, so ``z_ii = +1``
        (requires n == m); ``paired=False``: every pair is a negative (``z = -1``), as for a block of texts
        received from another process. The loss on one process is ``pair_sum(X, Y, ..., paired=True) / N``.
        """
        _check_features(image_features, text_features, "image_features", "text_features", same_shape=paired)
        with _float32_math(image_features.device):
            images, texts = image_features.float(), text_features.float()
            scale = _as_scalar(logit_scale, "logit_scale", images)  # t, the multiplier
            bias = _as_scalar(logit_bias, "logit_bias", images)
            row_sums = torch.cat(_blockwise(_row_softplus_sum, images, texts, scale, bias, chunk_size=self.chunk_size))
            if paired:
                # The diagonal's -l_ii: softplus(-l) = softplus(l) - l (class docstring). Subtracted per row,
                # where softplus(l_ii) ~ l_ii nearly cancels, rather than after summing over all rows.
                row_sums = row_sums - (scale * (images * texts).sum(dim=1) + bias)
            return row_sums.sum()

    def local_loss(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: Tensor
    ) -> Tensor:
        """``pair_sum(X, Y, paired=True) / N``."""
        total = self.pair_sum(image_features, text_features, logit_scale, logit_bias, paired=True)
        return total / image_features.shape[0]

    def distributed_loss(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: Tensor
    ) -> Tensor:
        """This rank's images against its own texts, then against each block passed around the ring (class
        docstring): ``sum_s pair_sum(X_r, Y_s) / N``."""
        total = self.pair_sum(image_features, text_features, logit_scale, logit_bias, paired=True)
        sizes = gather_ints(image_features.shape[0])
        rank, world_size = torch.distributed.get_rank(), len(sizes)
        texts = text_features
        for hop in range(1, world_size):
            # after this hop we hold rank (rank - hop)'s texts: every one of them is a negative for our images
            texts = neighbour_exchange_with_grad(
                texts, (rank + 1) % world_size, (rank - 1) % world_size, sizes[(rank - hop) % world_size]
            )
            total = total + self.pair_sum(image_features, texts, logit_scale, logit_bias, paired=False)
        return total / sum(sizes)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------
# every loss.kind, once
LOSSES: dict[str, type[ContrastiveLoss]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def build_loss(config: LossConfig, distributed: bool = False) -> ContrastiveLoss:
    """The loss module that ``config.kind`` names in :data:`LOSSES` (``clip`` -> ClipLoss, ``siglip`` -> SigLipLoss).

    ``distributed``: the process-group path (each rank returns its share of the global batch's loss).
    """
    if config.kind not in LOSSES:
        raise ValueError(f"loss.kind={config.kind!r} is not a loss; choose one of {sorted(LOSSES)}")
    return LOSSES[config.kind](chunk_size=config.chunk_size, distributed=distributed)
