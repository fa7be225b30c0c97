"""Approximate search with FAISS.

``clipforge index build`` makes an IVF (inverted lists over k-means cells) or HNSW (graph) index over an
embedding folder, by inner product, with the vectors kept as float16 (``SQfp16``), and stores it as
``faiss-<kind>.index`` beside the parts. Its search-time knob (``nprobe`` for IVF, ``efSearch`` for HNSW) is
tuned at build time: the smallest value (of 1, 2, 4, ...) whose recall@10 against exact search, measured on
``tune_queries`` stored rows used as queries (each query's own row left out), reaches ``target_recall`` with
a margin of two standard errors of that estimate. The value and the recall it reached are recorded in
``meta.json``, with the index file's size and SHA-256.

Nothing reaches FAISS unchecked, since FAISS answers a bad value with a C++ assertion that aborts the whole
process, a segfault, or silently wrong scores: the build parameters are checked against the ranges FAISS
handles (:func:`check_build_parameters`), and an index file is checked against its recorded size and checksum
before FAISS parses a byte of it (:func:`load_faiss_index`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipforge.io import atomic_write
from clipforge.search.exact import exact_search
from clipforge.search.faiss_loader import import_faiss
from clipforge.search.meta import StoreError, writer_lock
from clipforge.search.store import KINDS, EmbeddingStore

logger = logging.getLogger("clipforge")

ANN_KINDS = ("ivf", "hnsw")
_KNOB = {"ivf": "nprobe", "hnsw": "efSearch"}
MAX_HNSW_M = 512
MAX_EF_SEARCH = 4096  # the largest efSearch the tuning tries
MAX_TUNE_QUERIES = 100_000


class FaissIndexError(StoreError):
    """A FAISS index file that cannot be trusted: stale, missing, truncated, corrupted or of another store.
    ``Index(backend="auto")`` warns and searches exactly instead; ``backend="faiss"`` stops with it."""


@dataclass
class BuildReport:
    path: str
    factory: str
    knob: str
    value: int
    recall_at_10: float
    seconds: float


def _rows(matrices: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """float32 copies of the given global rows (sorted) of the concatenated parts."""
    out, offset = [], 0
    for matrix in matrices:
        mine = rows[(rows >= offset) & (rows < offset + len(matrix))] - offset
        out.append(np.asarray(matrix[mine], dtype=np.float32))
        offset += len(matrix)
    return np.concatenate(out)


def build_faiss_index(
    store: EmbeddingStore,
    kind: str = "images",
    ann: str = "ivf",
    nlist: int | None = None,
    hnsw_m: int = 32,
    target_recall: float = 0.95,
    tune_queries: int = 500,
    seed: int = 0,
) -> BuildReport:
    """Build, tune and save the FAISS index of ``store``'s ``kind`` embeddings.

    ``ivf``: ``IVF{nlist},SQfp16`` with nlist = round(sqrt(N)) by default (cells of about sqrt(N) vectors),
    trained on up to 64 * nlist sampled rows. ``hnsw``: ``HNSW{hnsw_m},SQfp16`` (no training, slower build).
    The parameters' ranges are :func:`check_build_parameters`'s; a value outside them is a ``ValueError``.

    Holds the folder's :func:`~clipforge.search.store.writer_lock` throughout: an ``embed`` into the folder (or
    a second build) stops at once with ``FolderBusyError`` instead of adding rows the index would not cover, and
    the index is recorded through ``update_meta``, so nothing another process saved in ``meta.json`` is lost.
    """
    check_build_parameters(kind, ann, nlist, hnsw_m, target_recall, tune_queries, seed)
    faiss = import_faiss()
    with writer_lock(store.root, "index build"):
        store.reload_meta()
        matrices = store.matrices(kind)
        store.table(kind)  # checked now: an index over rows the table cannot name would only fail in search
        count = sum(len(m) for m in matrices)
        if count == 0 or matrices[0].shape[1] == 0:
            raise ValueError(f"{store.root} holds no {kind} embeddings to index")
        if ann == "ivf":
            nlist = _check_nlist(nlist, count)
        generator = np.random.default_rng(seed)
        started = time.perf_counter()
        factory = f"IVF{nlist},SQfp16" if ann == "ivf" else f"HNSW{hnsw_m},SQfp16"
        dimension = matrices[0].shape[1]
        index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
        _fill(index, matrices, count, 64 * (nlist or 1), generator)
        limit = nlist if ann == "ivf" else MAX_EF_SEARCH
        value, recall = _tune(faiss, index, _KNOB[ann], limit, matrices, target_recall, tune_queries, generator)
        path = store.root / f"faiss-{kind}.index"
        data = faiss.serialize_index(index)  # (bytes,) uint8: the very bytes written are the ones hashed
        atomic_write(path, lambda handle: handle.write(data), replace=True)
        entry = {
            "file": path.name,
            "factory": factory,
            "count": count,
            "dim": int(dimension),
            "knob": _KNOB[ann],
            "value": value,
            "recall_at_10": recall,
            "bytes": int(data.nbytes),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        store.update_meta(lambda meta: _record(meta, kind, entry))
    return BuildReport(str(path), factory, _KNOB[ann], value, recall, time.perf_counter() - started)


def _record(meta: dict[str, Any], kind: str, entry: dict[str, Any]) -> None:
    if not isinstance(meta.get("faiss"), dict):
        meta["faiss"] = {}
    meta["faiss"][kind] = entry


def check_build_parameters(
    kind: str, ann: str, nlist: int | None, hnsw_m: int, target_recall: float, tune_queries: int, seed: int
) -> None:
    """``ValueError`` (naming the allowed range) unless FAISS can take these build parameters.

    The ranges, found by trying FAISS 1.15 (a bad value aborts or crashes the process, so it must never get one):

    * ``nlist`` (IVF cells): 1 <= nlist <= N, the rows indexed (checked once N is known). 0 crashes FAISS
      (segfault), a negative number is no factory string, and k-means needs at least nlist training points.
    * ``hnsw_m`` (HNSW links per node): 2 <= M <= 512. 0 fails an assertion that aborts the process, 1 crashes
      it (the level generator divides by log M); every row keeps 2 * M int32 links on the bottom level alone,
      so at M = 512 the graph takes 4 KiB a row, more than four times a 512-d float16 embedding; larger M
      (100000: 800 KB a row) exhausts memory long before it helps, and near 2^30 FAISS's int sizes overflow.
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


def _fill(index, matrices: list[np.ndarray], count: int, train_rows: int, generator: np.random.Generator) -> None:
    """Train ``index`` on up to ``train_rows`` sampled rows (if it needs training), then add every row."""
    if not index.is_trained:
        sample = np.sort(generator.choice(count, size=min(count, train_rows), replace=False))
        index.train(_rows(matrices, sample))
    for matrix in matrices:
        for start in range(0, len(matrix), 65536):  # float32 copies of 64k rows at a time, not of the whole set
            index.add(np.asarray(matrix[start : start + 65536], dtype=np.float32))


def _tune(
    faiss,
    index,
    knob: str,
    limit: int,
    matrices: list[np.ndarray],
    target_recall: float,
    tune_queries: int,
    generator: np.random.Generator,
) -> tuple[int, float]:
    """The smallest power-of-two ``knob`` value (up to ``limit``) whose recall@10 against exact search reaches
    ``target_recall`` with a margin; returns (value, measured recall).

    Stored rows are the queries, and each query's own row is left out of both lists: it is always found, in the
    cell it was added to, and would flatter the recall.
    """
    count = sum(len(m) for m in matrices)
    query_rows = np.sort(generator.choice(count, size=min(count, tune_queries), replace=False))
    queries = _rows(matrices, query_rows)
    neighbours = min(10, count - 1)
    _, truth = exact_search(matrices, torch.from_numpy(queries), neighbours + 1)
    value, recall = 1, 1.0
    while neighbours > 0:
        faiss.ParameterSpace().set_index_parameter(index, knob, value)
        _, found = index.search(queries, neighbours + 1)
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


def load_faiss_index(store: EmbeddingStore, kind: str = "images"):
    """The FAISS index of ``kind`` with its tuned knob set.

    ``FileNotFoundError`` when none was built. ``FaissIndexError`` (a ValueError) when it cannot be trusted,
    each naming the file and the fix (build it again): meta.json's entry is malformed; the file is missing;
    rows were embedded after the build (stale); the file's size or SHA-256 is not what the build recorded
    (truncated or corrupted: checked on the open file before FAISS parses a byte of it, and FAISS then reads
    that same open file, so a file replaced in between is never read unchecked); FAISS cannot read it; or the
    index read has another row count, width or metric than the store.

    An index built before checksums were recorded (no ``sha256`` in its entry) still loads: its file must be
    at least as large as its float16 codes (rows x width x 2 bytes, a truncation check), FAISS's reader must
    accept it (it refuses truncated files and out-of-range graph links) and its rows and width must match. A
    flipped byte in its codes cannot be seen there; ``Index`` also refuses scores a unit-vector index cannot
    give. Building it again adds the checksum.
    """
    entry = _entry(store, kind)
    path = store.root / entry["file"]
    if not path.is_file():
        raise untrusted_index(store, kind, path, "is missing (meta.json records an index there)")
    matrices = store.matrices(kind)
    count, dimension = sum(len(m) for m in matrices), matrices[0].shape[1] if matrices else 0
    if entry["count"] != count:
        raise untrusted_index(store, kind, path, f"covers {entry['count']} {kind} but the folder now holds {count}")
    faiss = import_faiss()
    with path.open("rb") as handle:
        codes = count * dimension * 2 if str(entry.get("factory", "")).endswith("SQfp16") else 0
        _check_file(handle, entry, store, kind, path, codes)
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
        except RuntimeError as error:  # FAISS's reader: truncations and inconsistent structures
            raise untrusted_index(store, kind, path, f"is not an index FAISS can read ({_first_line(error)})") from None
    if (index.ntotal, index.d, index.metric_type) != (count, dimension, faiss.METRIC_INNER_PRODUCT):
        raise untrusted_index(
            store, kind, path, f"holds {index.ntotal} vectors of width {index.d}; the folder has {count} of {dimension}"
        )
    try:
        faiss.ParameterSpace().set_index_parameter(index, entry["knob"], entry["value"])
    except RuntimeError as error:
        problem = f"does not take {entry['knob']}={entry['value']} ({_first_line(error)})"
        raise untrusted_index(store, kind, path, problem) from None
    return index


def _entry(store: EmbeddingStore, kind: str) -> dict[str, Any]:
    """meta.json's record of the ``kind`` index; FileNotFoundError when there is none, FaissIndexError when it
    is not a record the build writes."""
    entries = store.meta.get("faiss")
    entry = entries.get(kind) if isinstance(entries, dict) else None
    if entry is None:
        raise FileNotFoundError(f"{store.root} has no FAISS index for {kind}; build one with `clipforge index build`")
    path = store.root / f"faiss-{kind}.index"
    fields_ok = (
        isinstance(entry, dict)
        and entry.get("file") == path.name  # only ever this name: meta.json cannot point the reader elsewhere
        and _is_whole(entry.get("count"))
        and entry.get("knob") in _KNOB.values()
        and _is_whole(entry.get("value"))
        and all(_is_whole(entry[key]) for key in ("bytes", "dim") if key in entry)
        and (("sha256" not in entry and "bytes" not in entry) or isinstance(entry.get("sha256"), str))
    )
    if not fields_ok:
        raise untrusted_index(store, kind, path, "has a malformed record in meta.json")
    return entry


def _check_file(handle, entry: dict[str, Any], store: EmbeddingStore, kind: str, path, least: int) -> None:
    """Check the open index file against its recorded size and SHA-256 (or, without them, its least size),
    then rewind it for FAISS."""
    size = os.fstat(handle.fileno()).st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise untrusted_index(store, kind, path, f"is {size} bytes but was written with {entry['bytes']} (truncated?)")
    if "sha256" not in entry and size < least:
        raise untrusted_index(store, kind, path, f"is {size} bytes, less than its {least} bytes of vectors (truncated)")
    if "sha256" in entry and hashlib.file_digest(handle, "sha256").hexdigest() != entry["sha256"]:
        raise untrusted_index(store, kind, path, "does not have the SHA-256 it was written with (corrupted)")
    handle.seek(0)


def untrusted_index(store: EmbeddingStore, kind: str, path, problem: str) -> FaissIndexError:
    """The error for the ``kind`` index at ``path`` that cannot be used: the file, the ``problem`` (a phrase
    after the file's name), and the command that builds it again."""
    entry = (store.meta.get("faiss") or {}).get(kind) if isinstance(store.meta.get("faiss"), dict) else None
    ann = "hnsw" if isinstance(entry, dict) and str(entry.get("factory", "")).startswith("HNSW") else "ivf"
    command = f"clipforge index build --index {store.root} --ann {ann}" + (" --kind texts" if kind == "texts" else "")
    return FaissIndexError(f"the FAISS index {path} {problem}; build it again: `{command}`")


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def faiss_search(index, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) like ``exact_search``; rows FAISS could not fill (-1) are dropped from the tail.

    ``k`` is capped at the index's rows (FAISS would allocate Q x k results whatever it holds)."""
    k = min(int(k), index.ntotal)
    if k < 1:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    scores, rows = index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
    filled = int((rows != -1).all(axis=0).sum())  # any other negative row is left for the caller to refuse
    return scores[:, :filled], rows[:, :filled].astype(np.int64)
