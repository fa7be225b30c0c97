"""The embedding folder ``clipforge embed`` writes and ``clipforge search``/``serve`` read.

Layout::

    EMB_DIR/meta.json                 format stamp, the model (checkpoint, step, fingerprint), dtype, sources
    EMB_DIR/images/part-000000.npy    (n, D) unit-norm embeddings, float16 or float32, ``np.load(mmap_mode=...)``
    EMB_DIR/images/part-000000.jsonl  one row per embedding row: {"id", "path", "source", "index"}
    EMB_DIR/images/failed.jsonl       {"id", "reason"} of images that did not decode in the last run
    EMB_DIR/texts/part-*.npy|jsonl    the same for captions: {"id": caption}

Embeddings are appended as *parts*, never rewritten: a part's ``.npy`` is written first and its ``.jsonl``
last, each to a temporary name and renamed into place, so a part exists (is committed) exactly when its
table does. A crashed run leaves whole parts behind and the next run skips the ids they hold (resume). Row
``r`` of the store is row ``r - offset`` of the part that holds it, parts taken in name order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.io import atomic_write
from clipforge.version import __version__

FORMAT = "clipforge-embeddings"
FORMAT_VERSION = 1
KINDS = ("images", "texts")
DTYPES = ("float16", "float32")


@dataclass
class StoreTable:
    """The rows of one kind, as columns (a million dicts would cost far more memory than four lists)."""

    ids: list[str]
    paths: list[str]  # "" where the id is not a file (shards, built-in sets, captions)
    sources: np.ndarray  # (N,) int: index into meta["sources"], -1 for captions
    indices: np.ndarray  # (N,) int: the image's index in that source

    def __len__(self) -> int:
        return len(self.ids)


class EmbeddingStore:
    """An embedding folder: open it, check it belongs to a model, append parts, read parts back."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not an embedding folder (no meta.json); create one with "
                "`clipforge embed --checkpoint CKPT --images DIR --out EMB_DIR`"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a clipforge embedding folder's meta.json (no '{FORMAT}' stamp)")
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{self.root} was written by a newer clipforge (format {self.meta['format_version']})")

    # -- creating and checking ---------------------------------------------------------------------
    @classmethod
    def open_for_model(
        cls, root: str | os.PathLike, model_info: dict[str, Any], dtype: str = "float16"
    ) -> EmbeddingStore:
        """Open ``root`` to add embeddings of the model ``model_info`` describes, creating it if needed.

        ``model_info``: ``{"checkpoint", "step", "fingerprint", "embed_dim"}``. An existing folder must hold
        embeddings of the same model (same fingerprint) and dtype, else ``ValueError`` says so.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {list(DTYPES)}")
        root = Path(root)
        if not (root / "meta.json").is_file():
            if root.is_file():
                raise FileExistsError(f"--out {str(root)!r} is a file; expected a folder for the embeddings")
            root.mkdir(parents=True, exist_ok=True)
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "clipforge_version": __version__,
                "model": model_info,
                "dtype": dtype,
                "sources": [],
            }
            atomic_write(root / "meta.json", lambda handle: handle.write(json.dumps(meta, indent=2).encode()))
        store = cls(root)
        stored = store.meta["model"]
        if stored["fingerprint"] != model_info["fingerprint"]:
            raise ValueError(
                f"{root} holds embeddings of another model (checkpoint {stored['checkpoint']}, step "
                f"{stored['step']}); embeddings of two models cannot be searched together: choose a new --out"
            )
        if store.meta["dtype"] != dtype:
            raise ValueError(f"{root} stores {store.meta['dtype']} embeddings; pass --dtype {store.meta['dtype']}")
        return store

    def check_model(self, fingerprint: str) -> None:
        """Raise ``ValueError`` unless the store was embedded by the model with this fingerprint."""
        stored = self.meta["model"]
        if stored["fingerprint"] != fingerprint:
            raise ValueError(
                f"{self.root} was embedded with another model (checkpoint {stored['checkpoint']}, step "
                f"{stored['step']}); queries must be embedded by the same model: pass that checkpoint"
            )

    def source_number(self, spec: str) -> int:
        """The number of image source ``spec`` in ``meta["sources"]``, adding it (and saving meta) if new."""
        sources = self.meta["sources"]
        if spec not in sources:
            sources.append(spec)
            self.save_meta()
        return sources.index(spec)

    def save_meta(self) -> None:
        text = json.dumps(self.meta, indent=2).encode()
        atomic_write(self.root / "meta.json", lambda handle: handle.write(text))

    # -- parts ----------------------------------------------------------------------------------------
    def part_paths(self, kind: str) -> list[Path]:
        """The committed parts' ``.npy`` files of ``kind``, in order (a part is committed once its table is)."""
        folder = self.root / _check_kind(kind)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("part-*.npy") if p.with_suffix(".jsonl").is_file())

    def write_part(self, kind: str, embeddings: np.ndarray, rows: list[dict[str, Any]]) -> Path:
        """Append one part: ``embeddings`` (n, D) in the store's dtype and its n table ``rows``."""
        if len(embeddings) != len(rows):
            raise ValueError(f"{len(embeddings)} embeddings but {len(rows)} rows")
        folder = self.root / _check_kind(kind)
        folder.mkdir(exist_ok=True)
        taken = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.*") if p.stem.split("-")[1].isdigit()]
        path = folder / f"part-{max(taken, default=-1) + 1:06d}.npy"
        array = np.ascontiguousarray(embeddings, dtype=self.meta["dtype"])
        atomic_write(path, lambda handle: np.save(handle, array))
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        atomic_write(path.with_suffix(".jsonl"), lambda handle: handle.write(lines))
        return path

    def matrices(self, kind: str, mmap: bool = True) -> list[np.ndarray]:
        """Each part's (n, D) embeddings, memory-mapped (copy-on-write, so torch can wrap them without a copy)."""
        return [np.load(path, mmap_mode="c" if mmap else None) for path in self.part_paths(kind)]

    def table(self, kind: str) -> StoreTable:
        """All rows of ``kind`` in store order."""
        ids, paths, sources, indices = [], [], [], []
        for path in self.part_paths(kind):
            with path.with_suffix(".jsonl").open(encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    ids.append(row["id"])
                    paths.append(row.get("path") or "")
                    sources.append(row.get("source", -1))
                    indices.append(row.get("index", -1))
        return StoreTable(ids, paths, np.asarray(sources, dtype=np.int64), np.asarray(indices, dtype=np.int64))

    def count(self, kind: str) -> int:
        return sum(np.load(path, mmap_mode="r").shape[0] for path in self.part_paths(kind))

    # -- failures -------------------------------------------------------------------------------------
    def failures_path(self, kind: str) -> Path:
        return self.root / _check_kind(kind) / "failed.jsonl"

    def reset_failures(self, kind: str) -> None:
        """Start a run's failure list afresh: every run retries the items that failed before."""
        self.failures_path(kind).unlink(missing_ok=True)

    def add_failures(self, kind: str, failures: list[dict[str, str]]) -> None:
        if not failures:
            return
        path = self.failures_path(kind)
        path.parent.mkdir(exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(failure, ensure_ascii=False) + "\n" for failure in failures)

    def failures(self, kind: str) -> list[dict[str, str]]:
        path = self.failures_path(kind)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {list(KINDS)}")
    return kind
