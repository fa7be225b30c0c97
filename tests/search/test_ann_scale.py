"""`index build` for large folders: IVF-PQ (product-quantized codes, candidates re-scored exactly against the stored
rows) finds what exact search finds; a build reads the folder part by part and never holds it whole."""

from __future__ import annotations

import contextlib
import functools
import io
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from clipforge.cli import main  # noqa: E402
from clipforge.search.ann import StoredRows, rerank  # noqa: E402
from clipforge.search.ann_build import build_faiss_index  # noqa: E402
from clipforge.search.exact import exact_search  # noqa: E402
from clipforge.search.index import Index  # noqa: E402
from clipforge.search.store import EmbeddingStore  # noqa: E402


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """FAISS's OpenMP threads spin against each other on a busy 2-core machine (training took 8x longer)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered_store(root: Path, parts: int, rows: int, width: int, seed: int = 0) -> EmbeddingStore:
    """``parts`` parts of ``rows`` unit vectors each, drawn around 64 centres (as real embeddings cluster)."""
    model = {"checkpoint": "/runs/x/last.pt", "step": 1, "fingerprint": "e" * 64, "embed_dim": width}
    store = EmbeddingStore.open_for_model(root, model, "float16")
    generator = np.random.default_rng(seed)
    centres = generator.standard_normal((64, width)).astype(np.float32)
    for part in range(parts):
        vectors = centres[generator.integers(0, 64, rows)] + 0.6 * generator.standard_normal((rows, width))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.write_part("images", vectors.astype(np.float32), [{"id": f"{part}-{i}"} for i in range(rows)])
    return store


def test_ivfpq_answers_as_exact_search_does(tmp_path: Path) -> None:
    store = clustered_store(tmp_path / "emb", parts=6, rows=500, width=32)
    report = build_faiss_index(store, "images", "ivfpq", target_recall=0.95)
    assert report.factory == "IVF55,PQ4x8" and report.recall_at_10 >= 0.95  # 4 codes of 8 bits: 4 bytes a row
    entry = EmbeddingStore(store.root).meta["faiss"]["images"]
    assert entry["rerank"] == 10 and entry["bytes"] < 3000 * (4 + 8) + 64 * 1024  # codes and ids, not the vectors
    index = Index(EmbeddingStore(store.root), backend="faiss")
    assert index.rerank == 10
    matrix = np.concatenate(index.matrices).astype(np.float32)
    queries = torch.nn.functional.normalize(torch.from_numpy(matrix[::37]), dim=-1)  # as search_vectors takes them
    scores, rows = index.search_vectors(queries, k=10)
    exact_scores, exact_rows = exact_search(index.matrices, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows, strict=True)])
    assert overlap >= 0.9
    # every score is the exact float32 inner product of the stored row, never the codes' estimate
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", matrix[rows], queries.numpy()), rtol=0, atol=1e-5)
    assert (rows[:, 0] == exact_rows[:, 0]).all()  # each query's own row first, scored as exact search scores it
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], rtol=0, atol=1e-5)


def peak_python_memory(build: Callable[[], object]) -> int:
    """The most memory NumPy and Python held at once during ``build()`` (tracemalloc traces NumPy's buffers)."""
    tracemalloc.start()
    try:
        build()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_build_reads_the_folder_part_by_part(tmp_path: Path) -> None:
    width, rows, settings = 64, 2048, {"nlist": 64, "target_recall": 0.5, "tune_queries": 100}
    peaks = {}
    for parts in (10, 30):
        store = clustered_store(tmp_path / f"emb{parts}", parts=parts, rows=rows, width=width)
        peaks[parts] = peak_python_memory(functools.partial(build_faiss_index, store, "images", "ivfpq", **settings))
    whole = 30 * rows * width * 4  # the larger folder as float32: what a build that loads it all would hold
    # three times the rows, the same peak: the training sample (16,384 rows) and the re-scored candidates (at most
    # 16 MiB) are what a build holds, whatever the folder's size; every row's id is never held either
    assert peaks[30] < 1.25 * peaks[10], peaks
    assert peaks[30] < whole / 2, f"{peaks[30] / 2**20:.1f} MiB at peak for a {whole / 2**20:.1f} MiB folder"


def test_rerank_orders_candidates_by_their_stored_rows() -> None:
    stored = np.eye(4, dtype=np.float16)[[0, 1, 2, 3, 0]]  # rows 0 and 4 equal: a tie, broken by row
    rows = StoredRows.of_matrices([stored[:2], stored[2:]])
    queries = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2]])
    candidates = np.array([[1, 4, -1, 0, 4], [3, 2, 2, -1, -1]])  # FAISS's -1 and a repeated row
    scores, found = rerank(rows, queries, candidates, k=3)
    assert found.tolist() == [[0, 4], [2, 3]]  # as many as the query with the fewest valid candidates has
    np.testing.assert_allclose(scores, [[1.0, 1.0], [1.0, 0.2]], atol=1e-6)
    assert rows.take(np.array([4, 2, 0])).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]


def test_the_command_line_builds_ivfpq_and_refuses_a_code_size_that_does_not_divide(tmp_path: Path) -> None:
    root = clustered_store(tmp_path / "emb", parts=2, rows=400, width=32).root
    with contextlib.redirect_stdout(io.StringIO()) as output:
        assert main(["index", "build", "--index", str(root), "--ann", "ivfpq", "--pq-m", "8"]) == 0
    assert "built IVF20,PQ8x8" in output.getvalue()
    with contextlib.redirect_stderr(io.StringIO()) as error:
        assert main(["index", "build", "--index", str(root), "--ann", "ivfpq", "--pq-m", "5"]) == 2
    assert "pq_m=5 (--pq-m) does not divide the embedding width 32; choose one of [1, 2, 4, 8, 16, 32]" in (
        error.getvalue()
    )
