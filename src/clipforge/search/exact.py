"""Exact top-k by inner product over stored embeddings of any size, in blocks, on the CPU or a GPU.

Two kernels give the same answer:

* **Blocks in float32** (any queries, any dtype, any device): each block of rows is upcast to float32 and
  multiplied with the queries; each block's top-k is kept and the kept candidates are cut back to the top k
  every ``_MERGE_EVERY`` blocks. Memory is O(block_rows * D + 64 * Q * k) whatever the number of rows.
* **One query over float16 unit rows** (the search latency case, CPU): a float16 matrix-vector product reads
  the stored rows once without an upcast pass, which costs about 40% less CPU time than upcast + product
  (measured in benchmarks/search_speed.py). Its scores are only float16-accurate, so they select candidates,
  and the candidates are re-scored in float32. For unit vectors the float16 score ``s16`` of a row differs
  from its float32 score ``s`` by at most ``B = 2^-10`` (the query rounded to float16: <= 2^-11; the result
  rounded to float16: <= 2^-11 near 1; float32 accumulation: ~D 2^-24), a bound this module checks on the
  running machine before first use (else it keeps to the first kernel). Then every true top-k row r has
  ``s16_r >= s_r - B >= s_(k) - B >= s16_(k) - 2B``, where ``_(k)`` is the k-th largest: keeping every row
  with ``s16 >= s16_(k) - 2B`` keeps the true top k, and re-scoring them exactly gives the exact top k.

On the CPU, ``workers`` threads split the blocks between them and torch's own intra-op pool is set to one
thread for the duration: on a busy machine OpenMP's barriers inside every block cost more than the work
(measured), while threads that each stream their own blocks degrade gracefully.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

_MERGE_EVERY = 64
_FP16_SCORE_BOUND = 2.0**-10
_FP16_BLOCK_ROWS = 65536  # no float32 buffer on this path: larger blocks, fewer Python steps

Matrix = np.ndarray | torch.Tensor


def exact_search(
    matrices: Sequence[Matrix],
    queries: torch.Tensor,
    k: int,
    block_rows: int = 4096,
    workers: int = 1,
    unit_rows: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows by inner product ``queries @ M.T``, ``M`` = the row-wise concatenation of ``matrices``
    (the parts of a store: NumPy memory maps or tensors, float16 or float32).

    ``unit_rows``: the rows and the queries are unit vectors (as in an embedding folder), which allows the
    float16 candidate kernel for a single query on the CPU (see the module docstring).

    Returns (scores (Q, k'), rows (Q, k')) as NumPy arrays, k' = min(k, N), each row sorted by float32 score
    descending, equal scores by row ascending.
    """
    if queries.ndim != 2:
        raise ValueError(f"queries must be (Q, D), got {tuple(queries.shape)}")
    queries = queries.float()
    for matrix in matrices:
        if matrix.ndim != 2 or matrix.shape[1] != queries.shape[1]:
            raise ValueError(f"stored embeddings {tuple(matrix.shape)} do not match queries {tuple(queries.shape)}")
    total = sum(len(matrix) for matrix in matrices)
    k = min(k, total)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    on_cpu = queries.device.type == "cpu"
    float16 = all(matrix.dtype in (np.float16, torch.float16) for matrix in matrices)
    if unit_rows and on_cpu and float16 and len(queries) == 1 and _fp16_gemv_is_accurate():
        scores, rows = _float16_candidates(matrices, queries[0], k, workers)
    else:
        shares = _shares(matrices, block_rows, workers if on_cpu else 1)
        results = _run(lambda share: _scan_float32(share, queries, k, block_rows), shares)
        scores = torch.cat([r[0] for r in results], dim=1).cpu().numpy()
        rows = torch.cat([r[1] for r in results], dim=1).cpu().numpy()
    order = np.lexsort((rows, -scores), axis=1)[:, :k]  # score descending, then row ascending
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _shares(matrices: Sequence[Matrix], block_rows: int, workers: int) -> list[list[tuple[Matrix, int, int, int]]]:
    """The blocks of each worker: worker ``w`` streams store rows ``[w N / W, (w + 1) N / W)`` in order, cut at
    part boundaries and into blocks of at most ``block_rows``; each block is (matrix, first row of the block in
    it, first row of the block in the store, rows). Equal row counts, not equal block counts: with whole blocks
    dealt out, 1M rows in 64k blocks left one thread 8 blocks and the other 7.3, and the query waits for the
    slower one."""
    total = sum(len(matrix) for matrix in matrices)
    workers = max(1, min(workers, -(-total // block_rows)))
    bounds = [total * w // workers for w in range(workers + 1)]
    shares: list[list[tuple[Matrix, int, int, int]]] = [[] for _ in range(workers)]
    offset = 0
    for matrix in matrices:
        for worker in range(workers):
            first, last = max(bounds[worker], offset), min(bounds[worker + 1], offset + len(matrix))
            for start in range(first, last, block_rows):
                rows = min(block_rows, last - start)
                shares[worker].append((matrix, start - offset, start, rows))
        offset += len(matrix)
    return [share for share in shares if share]


def _tensor(matrix: Matrix, start: int, rows: int) -> torch.Tensor:
    block = matrix[start : start + rows]
    return torch.from_numpy(block) if isinstance(block, np.ndarray) else block


def _run(scan, shares: list[list]) -> list:
    """``scan`` over each worker's share of the blocks, one thread per share (each streams through memory in
    order), with torch single-threaded inside."""
    with _single_threaded_torch():
        if len(shares) == 1:
            return [scan(shares[0])]
        with ThreadPoolExecutor(len(shares)) as pool:
            return list(pool.map(scan, shares))


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside, restored after (new threads read the setting when they start)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _top(scores: list[torch.Tensor], rows: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores_, rows_ = torch.cat(scores, dim=1), torch.cat(rows, dim=1)
    if scores_.shape[1] <= k:
        return scores_, rows_
    keep = scores_.topk(k, dim=1).indices
    return scores_.gather(1, keep), rows_.gather(1, keep)


def _scan_float32(spans: list, queries: torch.Tensor, k: int, block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    # one float32 buffer per worker, reused: a fresh block allocation per step costs page faults
    buffer = torch.empty(min(block_rows, max(s[3] for s in spans)), queries.shape[1], device=queries.device)
    scores, rows_of = [], []
    for matrix, start, first_row, rows in spans:
        buffer[:rows].copy_(_tensor(matrix, start, rows))  # the upcast, block by block
        top = (queries @ buffer[:rows].T).topk(min(k, rows), dim=1)  # of the (Q, rows) scores
        scores.append(top.values)
        rows_of.append(top.indices + first_row)
        if len(scores) >= _MERGE_EVERY:
            merged = _top(scores, rows_of, k)
            scores, rows_of = [merged[0]], [merged[1]]
    return _top(scores, rows_of, k)


@functools.cache
def _fp16_gemv_is_accurate() -> bool:
    """Whether torch's float16 matrix-vector product here stays within ``_FP16_SCORE_BOUND`` of the exact
    product, for unit vectors, including scores near 1 (where float16 rounding is coarsest)."""
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(512, generator=generator), dim=0)
    rows = F.normalize(torch.randn(4096, 512, generator=generator), dim=-1)
    rows[:64] = F.normalize(query + 0.05 * torch.randn(64, 512, generator=generator), dim=-1)
    rows = rows.half()
    fast = torch.mv(rows, query.half()).double()
    return bool((fast - rows.double() @ query.double()).abs().max() <= _FP16_SCORE_BOUND)


def _scan_float16(spans: list, query16: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(this share's k best float16 scores, candidate rows: every row within 2B of the k-th best so far)."""
    best = torch.empty(0)
    candidates = []
    for matrix, start, first_row, rows in spans:
        scores = torch.mv(_tensor(matrix, start, rows), query16).float()  # (rows,)
        merged = torch.cat([best, scores.topk(min(k, rows)).values])
        best = merged.topk(min(k, len(merged))).values
        # the running k-th best only rises, so this never drops a row the final threshold would keep
        threshold = best[-1] - 2 * _FP16_SCORE_BOUND if len(best) == k else float("-inf")
        candidates.append(torch.nonzero(scores >= threshold).flatten() + first_row)
    return best, candidates


def _float16_candidates(
    matrices: Sequence[Matrix], query: torch.Tensor, k: int, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """The single-query kernel: float16 candidates, float32 re-scoring. Returns (1, n) scores and rows."""
    shares, query16 = _shares(matrices, _FP16_BLOCK_ROWS, workers), query.half()
    results = _run(lambda share: _scan_float16(share, query16, k), shares)
    # each share kept the rows within 2B of its own k-th best, which is at most the global one: a superset
    rows = torch.cat([c for _, candidates in results for c in candidates]).numpy()
    # re-score exactly, in float32: the candidates' stored rows, gathered part by part
    exact, offset, kept = [], 0, []
    for matrix in matrices:
        mine = rows[(rows >= offset) & (rows < offset + len(matrix))]
        if len(mine):
            block = matrix[mine - offset]
            block = torch.from_numpy(np.asarray(block)) if isinstance(block, np.ndarray) else block
            exact.append(block.float() @ query)
            kept.append(mine)
        offset += len(matrix)
    return torch.cat(exact).numpy()[None], np.concatenate(kept)[None].astype(np.int64)
