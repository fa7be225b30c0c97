"""Search an embedding folder: exact top-k (``exact.py``, any size, CPU or GPU), or a FAISS index when one is built.

``Index.load(dir, checkpoint)`` opens the folder ``clipforge embed`` wrote; ``index.search(text=..., k=10)``
embeds the query with the same model and returns the best rows with their cosine similarity.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.data.base import decode_image
from clipforge.eval.features import encode_texts
from clipforge.interop.load import from_pretrained
from clipforge.io import weights_fingerprint
from clipforge.model.factory import LoadedModel
from clipforge.search.exact import exact_search
from clipforge.search.meta import StoreError
from clipforge.search.store import EmbeddingStore, StoreTable

logger = logging.getLogger("clipforge")

BACKENDS = ("auto", "exact", "faiss")
# stored rows and queries are unit vectors, so a true score lies in [-1, 1] (float16 rounding adds ~1e-3);
# a FAISS index that answers outside this has corrupted codes
_SCORE_LIMIT = 1.01


@dataclass
class SearchHit:
    """One result: its rank (1 = best), row in the store, id, file path ("" if none) and cosine score."""

    rank: int
    row: int
    id: str
    path: str
    score: float


class Index:
    """An embedding folder opened for search; encodes queries with ``checkpoint`` when one is given.

    ``kind``: search the ``images`` (default) or the ``texts`` of the folder. ``backend``: ``exact``
    (every stored row scored: see ``clipforge.search.exact``), ``faiss`` (the approximate index
    ``clipforge index build`` wrote) or ``auto`` (FAISS when its index exists and is current; else exact).

    Opening reads and checks the folder (meta.json, every part, the table: ``StoreError`` names what is
    damaged), so a damaged folder fails here, not at the first query. A FAISS index that cannot be trusted
    (stale, truncated, corrupted: ``clipforge.search.ann.load_faiss_index``), or that answers a query with a
    score no unit vectors give, is a ``FaissIndexError`` under ``backend="faiss"``; under ``auto`` it is one
    warning naming the file and the fix, and exact search from then on.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        loaded: LoadedModel | None = None,
        kind: str = "images",
        backend: str = "auto",
        device: str | torch.device = "cpu",
        workers: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
        self.store = store
        self.kind = kind
        self.device = torch.device(device)
        self.matrices = store.matrices(kind)
        if not self.matrices:
            raise ValueError(f"{store.root} holds no {kind} embeddings; run `clipforge embed` first")
        self.loaded = loaded
        if loaded is not None:
            store.check_model(weights_fingerprint(loaded.model))
        self.table  # noqa: B018 - read (and checked) now: every hit needs it, and a damaged one should stop here
        # one search thread per core torch may use (more would only queue up)
        self.workers = workers or max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
        self.backend = backend
        self.rerank = 0  # an ivfpq index's candidates a result, re-scored exactly against the stored rows
        self.faiss = self._open_faiss(backend)
        self._sources: dict[int, object] = {}

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        checkpoint: str | os.PathLike | LoadedModel | None = None,
        kind: str = "images",
        backend: str = "auto",
        device: str | torch.device = "cpu",
        weights: str = "raw",
    ) -> Index:
        """Open ``directory``; ``checkpoint`` (a path or a loaded one) is needed for text and image queries;
        ``weights``: a checkpoint path's ``raw`` weights or their moving average (``ema``)."""
        if isinstance(checkpoint, str | os.PathLike):
            loaded = from_pretrained(checkpoint, device, weights)
        else:
            loaded = checkpoint
        return cls(EmbeddingStore(directory), loaded, kind=kind, backend=backend, device=device)

    def _open_faiss(self, backend: str):
        if backend == "exact":
            return None
        from clipforge.search.ann import load_faiss_index, rerank_factor

        try:
            index = load_faiss_index(self.store, self.kind)
            self.rerank = rerank_factor(self.store, self.kind)
            return index
        except (ImportError, FileNotFoundError, ValueError) as error:
            if backend == "faiss":
                raise
            if not isinstance(error, FileNotFoundError):  # none built: exact search is what was asked for
                logger.warning("using exact search: %s", error)
            return None

    def _distrust_faiss(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """Drop the FAISS index (``auto``: one warning) or raise (``faiss``): it answered what it cannot."""
        from clipforge.search.ann import untrusted_index

        worst = float(np.abs(scores).max()) if scores.size else 0.0
        answer = f"a score of {worst:.4g} for unit vectors (at most 1)" if not worst <= _SCORE_LIMIT else "bad rows"
        path = self.store.root / f"faiss-{self.kind}.index"
        error = untrusted_index(self.store, self.kind, path, f"returned {answer}: it is corrupted")
        if self.backend == "faiss":
            raise error
        logger.warning("using exact search: %s", error)
        self.faiss = None

    @cached_property
    def table(self) -> StoreTable:
        return self.store.table(self.kind)

    def __len__(self) -> int:
        return sum(len(m) for m in self.matrices)

    # -- queries ---------------------------------------------------------------------------------------
    def _require_model(self) -> LoadedModel:
        if self.loaded is None:
            raise ValueError("this query needs the model: open the index with a checkpoint (--checkpoint)")
        return self.loaded

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) unit-norm query embeddings."""
        loaded = self._require_model()
        return encode_texts(loaded.model, loaded.processor, list(texts))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[str | os.PathLike | Image.Image]) -> torch.Tensor:
        """(len(images), D) unit-norm embeddings of image files (or PIL images), evaluation transform."""
        loaded = self._require_model()
        device = next(loaded.model.parameters()).device
        return loaded.model.encode_image(loaded.processor.images(list(images)).to(device)).float()

    def row_embedding(self, row: int) -> torch.Tensor:
        """The stored (unit-norm) embedding of ``row`` as a float32 (D,) tensor."""
        for matrix in self.matrices:
            if row < len(matrix):
                return torch.from_numpy(np.asarray(matrix[row], dtype=np.float32))
            row -= len(matrix)
        raise IndexError("row out of range")

    def search_vectors(self, queries: torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the top k for each query embedding (Q, D), best first."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k={k!r}: the number of results must be a positive whole number")
        width = self.matrices[0].shape[1]
        if queries.ndim != 2 or queries.shape[1] != width:
            raise ValueError(f"queries of shape {tuple(queries.shape)}: this index holds (rows, {width}) embeddings")
        queries = F.normalize(queries.float(), dim=-1)
        index = self.faiss
        if index is not None:
            from clipforge.search.ann import StoredRows, faiss_search, rerank

            scores, rows = faiss_search(index, queries, k * max(1, self.rerank))
            valid_rows = ((rows >= 0) & (rows < len(self))).all()
            if valid_rows and self.rerank:  # approximate scores: the candidates' exact ones decide
                scores, rows = rerank(StoredRows.of_matrices(self.matrices), queries, rows, k)
            if valid_rows and np.isfinite(scores).all() and not (np.abs(scores) > _SCORE_LIMIT).any():
                return scores, rows
            self._distrust_faiss(scores, rows)
        return exact_search(self.matrices, queries.to(self.device), k, workers=self.workers)

    def search(
        self,
        text: str | None = None,
        image: str | os.PathLike | Image.Image | None = None,
        row: int | None = None,
        k: int = 10,
    ) -> list[SearchHit]:
        """The k best rows for one query: a ``text``, an ``image`` (a file or PIL image) or a stored ``row``."""
        given = [value is not None for value in (text, image, row)]
        if sum(given) != 1:
            raise ValueError("give exactly one query: text=..., image=... or row=...")
        if text is not None:
            if not text.strip():
                raise ValueError("the text query is empty")
            query = self.embed_text([text])
        elif image is not None:
            query = self.embed_images([image])
        else:
            if not 0 <= int(row) < len(self):
                raise IndexError(f"row {row} is not in the index (it has {len(self)} rows)")
            query = self.row_embedding(int(row))[None]
        scores, rows = self.search_vectors(query, k)
        return [
            self.hit(rank, int(r), float(s))
            for rank, (s, r) in enumerate(zip(scores[0], rows[0], strict=True), start=1)
        ]

    def hit(self, rank: int, row: int, score: float) -> SearchHit:
        return SearchHit(rank, row, self.table.ids[row], self.table.paths[row], score)

    # -- the stored items ------------------------------------------------------------------------------
    def load_image(self, row: int) -> Image.Image:
        """The image of ``row``: its file when it has one, else re-read from the source it was embedded from."""
        if self.kind != "images":
            raise ValueError("this index holds texts, not images")
        table = self.table
        if not 0 <= row < len(table):
            raise IndexError(f"row {row} is not in the index")
        if table.paths[row]:
            return decode_image(table.paths[row])
        number = int(table.sources[row])
        sources = self.store.meta["sources"]
        if not 0 <= number < len(sources):
            raise StoreError(
                f"row {row} was embedded from source {number}, which {self.store.root / 'meta.json'} does not list "
                f"(it lists {len(sources)}); embed its images again into a new folder"
            )
        if number not in self._sources:
            from clipforge.data.inputs import open_image_source

            self._sources[number] = open_image_source(sources[number])
        return self._sources[number].load_image(int(table.indices[row]))


def format_hits(hits: Sequence[SearchHit]) -> str:
    """The lines ``clipforge search`` prints: rank, score, path (or id)."""
    return "\n".join(f"{hit.rank:3d}  {hit.score:+.4f}  {hit.path or hit.id}" for hit in hits)
