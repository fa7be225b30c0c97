"""``clipforge index build``: a FAISS index over an embedding folder, trained on a sample, filled part by part, and
tuned to a recall target.

Kinds (``ann``), all by inner product:

* ``ivf``: ``IVF{nlist},SQfp16``, inverted lists over k-means cells holding the vectors as float16 (2 bytes a
  dimension: a 512-d row costs 1 KiB, so 10M rows take 10 GiB of memory when searched).
* ``ivfpq``: ``IVF{nlist},PQ{m}x{bits}``, the residual of each vector from its cell's centre product-quantized to
  ``m`` codes of ``bits`` bits (``m`` bytes a row with 8 bits: 64 for 512-d, so 10M rows take ~0.7 GiB with their
  ids). Its scores are approximate, so a search asks FAISS for ``rerank`` x k candidates and orders them by their
  exact scores against the stored float16 rows (read from the memory-mapped parts, only those rows): the answer is
  exact among the candidates, and recall is what the candidates cover.
* ``hnsw``: ``HNSW{M},SQfp16``, a graph (no training, slower build).

Memory is bounded by the index itself, never by the folder: the training sample is at most ``64 * nlist`` rows
(and enough for the quantizers), read part by part; rows are added part by part, 65,536 at a time, each part
opened only while it is read; the tables are checked part by part; the exact answers the tuning compares with
are computed part by part; and the index is written and hashed as FAISS streams it, not copied whole first.

Tuning: the search-time knob (``nprobe`` for IVF, ``efSearch`` for HNSW) is the smallest of 1, 2, 4, ... whose
recall@10 against exact search, measured on ``tune_queries`` stored rows used as queries (each query's own row left
out), reaches ``target_recall`` with a margin of two standard errors of that estimate. The value and the recall it
reached are recorded in ``meta.json`` with the index file's size and SHA-256 (``clipforge.search.ann`` checks them
before FAISS reads a byte of it).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipforge.config.choices import ANN_KINDS
from clipforge.io import atomic_write
from clipforge.search.ann import KNOBS, StoredRows, rerank
from clipforge.search.exact import exact_search
from clipforge.search.faiss_loader import import_faiss
from clipforge.search.meta import writer_lock
from clipforge.search.store import KINDS, EmbeddingStore

MAX_HNSW_M = 512
MAX_EF_SEARCH = 4096  # the largest efSearch the tuning tries
MAX_TUNE_QUERIES = 100_000
ADD_ROWS = 65536  # float32 copies of this many rows at a time go to FAISS, not of the whole set
RERANK = 10  # ivfpq: candidates per result re-scored exactly
PQ_BITS = 8


@dataclass
class BuildReport:
    path: str
    factory: str
    knob: str
    value: int
    recall_at_10: float
    seconds: float


def build_faiss_index(
    store: EmbeddingStore,
    kind: str = "images",
    ann: str = "ivf",
    nlist: int | None = None,
    hnsw_m: int = 32,
    target_recall: float = 0.95,
    tune_queries: int = 500,
    seed: int = 0,
    pq_m: int | None = None,
) -> BuildReport:
    """Build, tune and save the FAISS index of ``store``'s ``kind`` embeddings (module docstring).

    ``nlist`` (IVF cells): round(sqrt(N)) by default (cells of about sqrt(N) vectors). ``pq_m`` (``ivfpq`` codes a
    row): a divisor of the width, by default the largest at most width / 8. The parameters' ranges are
    :func:`check_build_parameters`'s; a value outside them is a ``ValueError``.

    Holds the folder's :func:`~clipforge.search.meta.writer_lock` throughout: an ``embed`` into the folder (or a
    second build) stops at once with ``FolderBusyError`` instead of adding rows the index would not cover, and the
    index is recorded through ``update_meta``, so nothing another process saved in ``meta.json`` is lost.
    """
    check_build_parameters(kind, ann, nlist, hnsw_m, target_recall, tune_queries, seed, pq_m)
    faiss = import_faiss()
    with writer_lock(store.root, "index build"):
        store.reload_meta()
        rows = StoredRows.of_store(store, kind)
        for _ in store.tables(kind):  # checked now: an index over rows the table cannot name would only fail in search
            pass
        count, dimension = len(rows), rows.width
        if count == 0 or dimension == 0:
            raise ValueError(f"{store.root} holds no {kind} embeddings to index")
        started = time.perf_counter()
        generator = np.random.default_rng(seed)
        nlist = _check_nlist(nlist, count) if ann != "hnsw" else None
        factory, train_rows = _factory(ann, nlist, hnsw_m, _check_pq_m(pq_m, dimension) if ann == "ivfpq" else 0, count)
        index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
        if hasattr(index, "do_polysemous_training"):
            # FAISS's default for IVF-PQ: codes ordered for Hamming pre-filtering, which these searches never use;
            # it made training 30x slower (27 s instead of 0.8 s for 16k rows of 64-d)
            index.do_polysemous_training = False
        _fill(index, rows, train_rows, generator)
        factor = RERANK if ann == "ivfpq" else 0
        limit = nlist if nlist is not None else MAX_EF_SEARCH
        value, recall = _tune(faiss, index, KNOBS[ann], limit, rows, factor, target_recall, tune_queries, generator)
        path = store.root / f"faiss-{kind}.index"
        size, sha256 = _write(faiss, index, path)
        entry = {
            "file": path.name,
            "factory": factory,
            "count": count,
            "dim": int(dimension),
            "knob": KNOBS[ann],
            "value": value,
            "recall_at_10": recall,
            "bytes": size,
            "sha256": sha256,
            **({"rerank": factor} if factor else {}),
        }
        store.update_meta(lambda meta: _record(meta, kind, entry))
    return BuildReport(str(path), factory, KNOBS[ann], value, recall, time.perf_counter() - started)


def _factory(ann: str, nlist: int | None, hnsw_m: int, pq_m: int, count: int) -> tuple[str, int]:
    """(FAISS factory string, rows to train on). PQ's codebooks want 2^bits centres per code from their sample:
    a folder smaller than 256 rows gets fewer bits."""
    if ann == "hnsw":
        return f"HNSW{hnsw_m},SQfp16", 0
    if ann == "ivf":
        return f"IVF{nlist},SQfp16", min(count, 64 * nlist)
    bits = min(PQ_BITS, max(1, int(math.log2(count))))
    return f"IVF{nlist},PQ{pq_m}x{bits}", min(count, max(64 * nlist, 64 * 2**bits))


def _record(meta: dict[str, Any], kind: str, entry: dict[str, Any]) -> None:
    if not isinstance(meta.get("faiss"), dict):
        meta["faiss"] = {}
    meta["faiss"][kind] = entry


def check_build_parameters(
    kind: str,
    ann: str,
    nlist: int | None,
    hnsw_m: int,
    target_recall: float,
    tune_queries: int,
    seed: int,
    pq_m: int | None = None,
) -> None:
    """``ValueError`` (naming the allowed range) unless FAISS can take these build parameters.

    The ranges, found by trying FAISS 1.15 (a bad value aborts or crashes the process, so it must never get one):

    * ``nlist`` (IVF cells): 1 <= nlist <= N, the rows indexed (checked once N is known). 0 crashes FAISS
      (segfault), a negative number is no factory string, and k-means needs at least nlist training points.
    * ``hnsw_m`` (HNSW links per node): 2 <= M <= 512. 0 fails an assertion that aborts the process, 1 crashes
      it (the level generator divides by log M); every row keeps 2 * M int32 links on the bottom level alone,
      so at M = 512 the graph takes 4 KiB a row, more than four times a 512-d float16 embedding; larger M
      (100000: 800 KB a row) exhausts memory long before it helps, and near 2^30 FAISS's int sizes overflow.
    * ``pq_m`` (``ivfpq`` codes a row): a whole number >= 1 that divides the width (checked once the width is
      known): FAISS's product quantizer asserts (aborting the process) on one that does not.
    * ``target_recall``: 0 < recall <= 1. Recall is a fraction: a larger target (or NaN) can never be met and
      would silently tune to the slowest setting.
    * ``tune_queries``: 1 to 100000 queries; each is a float32 copy of a stored row scored exactly, and 100000
      already pins recall@10 to within about 0.002.
    * ``seed``: a whole number >= 0 (NumPy's generator takes no negative seed).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {list(KINDS)}")
    if ann not in ANN_KINDS:
        raise ValueError(f"ann={ann!r}: choose one of {list(ANN_KINDS)}")
    if nlist is not None:
        _check_whole("nlist (--nlist, IVF cells: at most one per indexed row)", nlist, 1, None)
    if pq_m is not None:
        _check_whole("pq_m (--pq-m, codes a row: a divisor of the embedding width)", pq_m, 1, None)
    _check_whole("hnsw_m (--hnsw-m, HNSW links per node)", hnsw_m, 2, MAX_HNSW_M)
    valid_recall = isinstance(target_recall, numbers.Real) and not isinstance(target_recall, bool)
    if not (valid_recall and 0 < target_recall <= 1):  # also False for NaN
        raise ValueError(
            f"target_recall={target_recall!r} (--target-recall): recall@10 is a fraction; choose one in (0, 1]"
        )
    _check_whole("tune_queries (stored rows used as queries)", tune_queries, 1, MAX_TUNE_QUERIES)
    _check_whole("seed", seed, 0, None)


def _check_whole(name: str, value: Any, low: int, high: int | None) -> None:
    """ValueError unless ``value`` is a whole number (not a bool) from ``low`` to ``high`` (None: no bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high and value > high):
        allowed = f"from {low} to {high}" if high else f"{low} or more"
        label = name.replace(" (", f"={value!r} (", 1) if " (" in name else f"{name}={value!r}"
        raise ValueError(f"{label} must be a whole number {allowed}")


def _check_nlist(nlist: int | None, count: int) -> int:
    """``nlist``, or round(sqrt(N)) by default; ValueError when there are fewer rows than cells."""
    if nlist is None:
        return max(1, min(round(math.sqrt(count)), count // 39))  # FAISS wants >= 39 points per cell
    if nlist > count:
        raise ValueError(
            f"nlist={nlist} (--nlist) is more IVF cells than the {count} rows to index: k-means needs a row per "
            f"cell; choose from 1 to {count} (default round(sqrt(N)))"
        )
    return int(nlist)


def _check_pq_m(pq_m: int | None, dimension: int) -> int:
    """``pq_m``, or the largest divisor of the width at most width / 8 (8 dimensions a code); ValueError for one
    that does not divide the width."""
    if pq_m is None:
        return max(m for m in range(1, max(1, dimension // 8) + 1) if dimension % m == 0)
    if dimension % pq_m:
        divisors = [m for m in range(1, dimension + 1) if dimension % m == 0]
        raise ValueError(
            f"pq_m={pq_m} (--pq-m) does not divide the embedding width {dimension}; choose one of {divisors}"
        )
    return int(pq_m)


def _fill(index, rows: StoredRows, train_rows: int, generator: np.random.Generator) -> None:
    """Train ``index`` on ``train_rows`` sampled rows (if it needs training), then add every row, part by part."""
    if not index.is_trained:
        sample = np.sort(generator.choice(len(rows), size=train_rows, replace=False))
        index.train(rows.take(sample))
    for block in rows.blocks(ADD_ROWS):
        index.add(block)


def _exact(rows: StoredRows, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-``k`` rows of each query (Q, k), computed part by part and merged (score descending, then
    row ascending, as ``exact_search`` orders them)."""
    best_scores = np.empty((len(queries), 0), np.float32)
    best_rows = np.empty((len(queries), 0), np.int64)
    queries = torch.from_numpy(queries)
    for start, matrix in rows.parts():
        scores, found = exact_search([matrix], queries, k)
        scores, found = np.concatenate([best_scores, scores], 1), np.concatenate([best_rows, found + start], 1)
        order = np.lexsort((found, -scores), axis=1)[:, :k]
        best_scores, best_rows = np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)
    return best_rows


def _tune(
    faiss,
    index,
    knob: str,
    limit: int,
    rows: StoredRows,
    factor: int,
    target_recall: float,
    tune_queries: int,
    generator: np.random.Generator,
) -> tuple[int, float]:
    """The smallest power-of-two ``knob`` value (up to ``limit``) whose recall@10 against exact search reaches
    ``target_recall`` with a margin; returns (value, measured recall). ``factor``: re-rank that many candidates a
    result exactly, as searches of the index will.

    Stored rows are the queries, and each query's own row is left out of both lists: it is always found, in the
    cell it was added to, and would flatter the recall.
    """
    count = len(rows)
    query_rows = np.sort(generator.choice(count, size=min(count, tune_queries), replace=False))
    queries = rows.take(query_rows)
    neighbours = min(10, count - 1)
    truth = _exact(rows, queries, neighbours + 1)
    value, recall = 1, 1.0
    while neighbours > 0:
        faiss.ParameterSpace().set_index_parameter(index, knob, value)
        wanted = (neighbours + 1) * max(1, factor)
        _, found = index.search(queries, min(wanted, count))
        if factor:
            _, found = rerank(rows, torch.from_numpy(queries), found, neighbours + 1)
        per_query = np.array(
            [
                len(_others(f, own, neighbours) & _others(t, own, neighbours)) / neighbours
                for f, t, own in zip(found, truth, query_rows, strict=True)
            ]
        )
        recall = float(per_query.mean())
        # the sample's mean less two standard errors: the target should hold for other queries too
        lower_bound = recall - 2 * float(per_query.std()) / np.sqrt(len(per_query))
        if lower_bound >= target_recall or value >= limit:
            break
        value = min(limit, value * 2)
    return value, recall


def _others(rows: np.ndarray, own: int, count: int) -> set[int]:
    """The first ``count`` rows other than ``own`` (and other than FAISS's -1 for "no result")."""
    return set([int(r) for r in rows if r != own and r >= 0][:count])


def _write(faiss, index, path) -> tuple[int, str]:
    """Write ``index`` to ``path`` as FAISS streams it, hashing the very bytes written: (size, SHA-256)."""
    digest, size = hashlib.sha256(), 0

    def write(handle) -> None:
        def chunk(data: bytes) -> int:
            nonlocal size
            digest.update(data)
            size += len(data)
            handle.write(data)
            return len(data)

        faiss.write_index(index, faiss.PyCallbackIOWriter(chunk))

    atomic_write(path, write, replace=True)
    return size, digest.hexdigest()
