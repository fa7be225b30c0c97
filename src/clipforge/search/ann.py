"""Approximate search with FAISS: an index ``clipforge index build`` made (``clipforge.search.ann_build``), opened
only once it is checked, and searched.

Nothing reaches FAISS unchecked, since FAISS answers a bad value with a C++ assertion that aborts the whole
process, a segfault, or silently wrong scores: an index file is checked against its recorded size and checksum
before FAISS parses a byte of it (:func:`load_faiss_index`), and its record in ``meta.json`` is checked field by
field. A product-quantized index (``ivfpq``) records ``rerank``: its candidates are re-scored exactly
(:func:`rerank`) against the stored rows (:class:`StoredRows`: any rows of a folder, reading only their parts).
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from clipforge.search.faiss_loader import import_faiss
from clipforge.search.meta import StoreError
from clipforge.search.store import EmbeddingStore

logger = logging.getLogger("clipforge")

KNOBS = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}  # each kind's search-time knob
RERANK_FLOATS = 2**22  # float32 values of candidate rows re-scored at once (16 MiB)


class FaissIndexError(StoreError):
    """A FAISS index file that cannot be trusted: stale, missing, truncated, corrupted or of another store.
    ``Index(backend="auto")`` warns and searches exactly instead; ``backend="faiss"`` stops with it."""


class StoredRows:
    """The rows of a folder's parts as one (N, D) matrix to read from: by row number, or part by part. Each part is
    opened only while it is read (``of_store``), or given open (``of_matrices``, a search's memory maps)."""

    def __init__(self, sizes: list[int], width: int, open_part: Callable[[int], np.ndarray]) -> None:
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.width = width
        self._open = open_part

    @classmethod
    def of_store(cls, store: EmbeddingStore, kind: str) -> StoredRows:
        paths = store.part_paths(kind)
        shapes = [store.open_part(path).shape for path in paths]  # headers only; each map is closed again
        if len({shape[1] for shape in shapes}) > 1:
            raise StoreError(f"the {kind} parts of {store.root} differ in width: embed them again into a new folder")
        return cls(
            [shape[0] for shape in shapes], shapes[0][1] if shapes else 0, lambda i: store.open_part(paths[i], "c")
        )

    @classmethod
    def of_matrices(cls, matrices: list[np.ndarray]) -> StoredRows:
        return cls([len(m) for m in matrices], matrices[0].shape[1] if matrices else 0, matrices.__getitem__)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 copies (len(rows), D) of the given rows (any order, repeats allowed), each part opened once."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.width), np.float32)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for part in np.unique(part_of):
            mine = np.flatnonzero(part_of == part)
            out[mine] = self._open(int(part))[rows[mine] - self.offsets[part]]
        return out

    def parts(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, the part's (n, D) rows as stored) for each part in order."""
        for number in range(len(self.sizes)):
            yield int(self.offsets[number]), self._open(number)

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """float32 copies of the rows in order, at most ``size`` at a time, never crossing a part."""
        for _, matrix in self.parts():
            for start in range(0, len(matrix), size):
                yield np.asarray(matrix[start : start + size], dtype=np.float32)


def rerank(rows: StoredRows, queries: torch.Tensor, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) (Q, k') of the best ``k`` of each query's ``candidates`` (Q, C) by their exact inner product
    with the stored rows, best first, ties by row; FAISS's -1 (no candidate) and repeats are left out, and k' is
    the fewest valid candidates of any query, at most ``k``. Queries go in groups whose candidates' float32 copies
    take at most ``RERANK_FLOATS``."""
    queries = queries.float().cpu().numpy()
    group = max(1, RERANK_FLOATS // max(1, candidates.shape[1] * rows.width))
    scores = (
        np.concatenate(
            [
                _exact_scores(rows, queries[start : start + group], candidates[start : start + group])
                for start in range(0, len(queries), group)
            ]
        )
        if len(queries)
        else np.empty(candidates.shape, np.float32)
    )
    order = np.lexsort((candidates, -scores), axis=1)
    ranked_scores, ranked = np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)
    repeat = np.zeros(ranked.shape, dtype=bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]  # a row twice among the candidates sits twice in a row
    keep = (ranked >= 0) & ~repeat & np.isfinite(ranked_scores)
    width = min(k, int(keep.sum(axis=1).min())) if len(keep) else 0
    picked = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # the kept columns, in rank order
    return np.take_along_axis(ranked_scores, picked, 1), np.take_along_axis(ranked, picked, 1)


def _exact_scores(rows: StoredRows, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(Q, C) float32 inner products of each query with its candidate rows; -inf where there is no candidate."""
    valid = candidates >= 0
    vectors = rows.take(np.where(valid, candidates, 0).reshape(-1)).reshape(*candidates.shape, rows.width)
    scores = np.einsum("qcd,qd->qc", vectors, queries).astype(np.float32)
    return np.where(valid, scores, np.float32(-np.inf))


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
        and entry.get("knob") in KNOBS.values()
        and _is_whole(entry.get("value"))
        and all(_is_whole(entry[key]) for key in ("bytes", "dim", "rerank") if key in entry)
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
    factory = str(entry.get("factory", "")) if isinstance(entry, dict) else ""
    ann = "hnsw" if factory.startswith("HNSW") else "ivfpq" if ",PQ" in factory else "ivf"
    command = f"clipforge index build --index {store.root} --ann {ann}" + (" --kind texts" if kind == "texts" else "")
    return FaissIndexError(f"the FAISS index {path} {problem}; build it again: `{command}`")


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def rerank_factor(store: EmbeddingStore, kind: str) -> int:
    """How many candidates a result the ``kind`` index's searches re-score exactly (0: none; its scores are
    float16-exact already)."""
    return int(_entry(store, kind).get("rerank", 0))


def faiss_search(index, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) like ``exact_search``; rows FAISS could not fill (-1) are dropped from the tail.

    ``k`` is capped at the index's rows (FAISS would allocate Q x k results whatever it holds)."""
    k = min(int(k), index.ntotal)
    if k < 1:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    scores, rows = index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
    filled = int((rows != -1).all(axis=0).sum())  # any other negative row is left for the caller to refuse
    return scores[:, :filled], rows[:, :filled].astype(np.int64)
