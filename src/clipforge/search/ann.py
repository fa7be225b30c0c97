"""Approximate search with FAISS.

``clipforge index build`` makes an IVF (inverted lists over k-means cells) or HNSW (graph) index over an
embedding folder, by inner product, with the vectors kept as float16 (``SQfp16``), and stores it as
``faiss-<kind>.index`` beside the parts. Its search-time knob (``nprobe`` for IVF, ``efSearch`` for HNSW) is
tuned at build time: the smallest value (of 1, 2, 4, ...) whose recall@10 against exact search, measured on
``tune_queries`` stored rows used as queries (each query's own row left out), reaches ``target_recall`` with
a margin of two standard errors of that estimate. The value and the recall it reached are recorded in
``meta.json``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from clipforge.io import atomic_write
from clipforge.search.exact import exact_search
from clipforge.search.faiss_loader import import_faiss
from clipforge.search.store import EmbeddingStore

logger = logging.getLogger("clipforge")

ANN_KINDS = ("ivf", "hnsw")
_KNOB = {"ivf": "nprobe", "hnsw": "efSearch"}


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
    """
    faiss = import_faiss()
    if ann not in ANN_KINDS:
        raise ValueError(f"ann={ann!r}: choose one of {list(ANN_KINDS)}")
    matrices = store.matrices(kind)
    count = sum(len(m) for m in matrices)
    if count == 0:
        raise ValueError(f"{store.root} holds no {kind} embeddings to index")
    generator = np.random.default_rng(seed)
    started = time.perf_counter()
    if ann == "ivf":
        nlist = nlist or max(1, min(round(math.sqrt(count)), count // 39))  # FAISS wants >= 39 points per cell
    factory = f"IVF{nlist},SQfp16" if ann == "ivf" else f"HNSW{hnsw_m},SQfp16"
    index = faiss.index_factory(matrices[0].shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    _fill(index, matrices, count, 64 * (nlist or 1), generator)
    limit = nlist if ann == "ivf" else 4096
    value, recall = _tune(faiss, index, _KNOB[ann], limit, matrices, target_recall, tune_queries, generator)
    path = store.root / f"faiss-{kind}.index"
    atomic_write(path, lambda handle: handle.write(faiss.serialize_index(index).tobytes()))
    report = BuildReport(str(path), factory, _KNOB[ann], value, recall, time.perf_counter() - started)
    store.meta.setdefault("faiss", {})[kind] = {
        "file": path.name,
        "factory": factory,
        "count": count,
        "knob": _KNOB[ann],
        "value": value,
        "recall_at_10": recall,
    }
    store.save_meta()
    return report


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
    """The FAISS index of ``kind`` with its tuned knob set; FileNotFoundError when none was built,
    ValueError when it is stale (rows were embedded after it was built)."""
    entry = store.meta.get("faiss", {}).get(kind)
    if entry is None or not (store.root / entry["file"]).is_file():
        raise FileNotFoundError(f"{store.root} has no FAISS index for {kind}; build one with `clipforge index build`")
    faiss = import_faiss()
    count = store.count(kind)
    if entry["count"] != count:
        raise ValueError(
            f"the FAISS index of {store.root} covers {entry['count']} {kind} but the folder now holds {count}; "
            "rebuild it with `clipforge index build`"
        )
    index = faiss.read_index(str(store.root / entry["file"]))
    faiss.ParameterSpace().set_index_parameter(index, entry["knob"], entry["value"])
    return index


def faiss_search(index, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) like ``exact_search``; rows FAISS could not fill (-1) are dropped from the tail."""
    scores, rows = index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
    filled = int((rows >= 0).all(axis=0).sum())
    return scores[:, :filled], rows[:, :filled].astype(np.int64)
