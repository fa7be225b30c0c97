"""Exact top-k by inner product over stored embeddings of any size, in blocks, on the CPU or a GPU.

Two kernels give the same answer:

* **Blocks in float32** (any queries, any dtype, any device): each block of rows is upcast to float32 and
  multiplied with the queries; each block's top-k is kept and the kept candidates are cut back to the top k
  every ``_MERGE_EVERY`` blocks. Memory is O(block_rows * D + 64 * Q * k) whatever the number of rows.
* **One query over float16 rows** (the search latency case, CPU): FAISS's float16 scanner (the one its
  ``SQfp16`` indexes run, here over the stored rows in place, no copy) decodes each row to float32 in SIMD
  registers and keeps a heap of the k best float32 scores, so the rows are read once and nothing else
  touches memory: 1.10-1.21x the time of a plain streaming read of the same bytes on 2 cores, where torch's
  float16 matrix-vector product (compute-bound on one core) with a re-score of its candidates took 1.5-1.75x
  (benchmarks/search_speed.py). Its scores are float32 inner products of the stored values, as the blocks
  kernel's are (up to the order of summation).

On the CPU, ``workers`` threads split the blocks between them and torch's own intra-op pool is set to one
thread for the duration: on a busy machine OpenMP's barriers inside every block cost more than the work
(measured), while threads that each stream their own blocks degrade gracefully.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from clipforge.search.faiss_loader import import_faiss

_MERGE_EVERY = 64
_FP16_BLOCK_ROWS = 65536  # rows per FAISS call: a row's offset in its block is the low 32 bits of its label

Matrix = np.ndarray | torch.Tensor


def exact_search(
    matrices: Sequence[Matrix],
    queries: torch.Tensor,
    k: int,
    block_rows: int = 4096,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows by inner product ``queries @ M.T``, ``M`` = the row-wise concatenation of ``matrices``
    (the parts of a store: NumPy memory maps or tensors, float16 or float32).

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
    if on_cpu and float16 and len(queries) == 1:
        query = np.ascontiguousarray(queries[0].numpy())  # float32; every worker's scanner points at it
        results = _run(lambda share: _scan_float16(share, query, k), _shares(matrices, _FP16_BLOCK_ROWS, workers))
        scores = np.concatenate([r[0] for r in results])[None]
        rows = np.concatenate([r[1] for r in results])[None]
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


def _scan_float16(spans: list, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of this share's k best rows by float32 inner product with ``query`` (D,) float32,
    C-contiguous and alive until the scan ends (the scanner keeps its pointer), in no order. One FAISS scanner and one heap for the whole share: block ``b`` is scanned as inverted list ``b``,
    so a kept row's label is ``b << 32 | its offset in the block`` (FAISS's store_pairs labels)."""
    faiss = import_faiss()
    # a min-heap on the scores (its root the k-th best so far), empty slots at -inf with label -1
    scores, labels = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)
    firsts = []
    with _float16_scanner(len(query)) as scanner:
        scanner.set_query(faiss.swig_ptr(query))
        for block, (matrix, start, first_row, rows) in enumerate(spans):
            codes = _array(matrix, start, rows).view(np.uint8).reshape(-1)
            scanner.set_list(block, 0.0)
            scanner.scan_codes(rows, faiss.swig_ptr(codes), None, faiss.swig_ptr(scores), faiss.swig_ptr(labels), k)
            firsts.append(first_row)
    kept = labels >= 0
    labels = labels[kept]
    return scores[kept], np.asarray(firsts, np.int64)[labels >> 32] + (labels & 0xFFFFFFFF)


_SCANNERS: dict[int, queue.SimpleQueue] = {}


@contextlib.contextmanager
def _float16_scanner(dim: int) -> Iterator:
    """A FAISS float16 inner-product scanner of ``dim``-wide rows, borrowed from a pool and given back. They
    are kept, not freed: deleting one through faiss's Python wrapper breaks the wrapper's type table (the
    next scanner comes back as a bare SwigPyObject, seen with faiss-cpu 1.15). So a process holds as many
    as it ever ran scans at once (20,000 queries in a loop left the resident size flat)."""
    free = _SCANNERS.setdefault(dim, queue.SimpleQueue())
    try:
        held = free.get_nowait()
    except queue.Empty:
        faiss = import_faiss()
        quantizer = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
        held = (quantizer, quantizer.select_InvertedListScanner(faiss.METRIC_INNER_PRODUCT, None, True, None, False))
    try:
        yield held[1]
    finally:
        free.put(held)


def _array(matrix: Matrix, start: int, rows: int) -> np.ndarray:
    """Rows ``[start, start + rows)`` as a C-contiguous NumPy array: a view of a memory map or a CPU tensor."""
    block = matrix[start : start + rows]
    return np.ascontiguousarray(block.numpy() if isinstance(block, torch.Tensor) else block)
