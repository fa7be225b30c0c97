"""The embedding folder ``clipforge embed`` writes and ``clipforge search``/``serve`` read.

Layout::

    EMB_DIR/meta.json                 format stamp, the model (checkpoint, step, fingerprint), dtype, sources
    EMB_DIR/images/part-000000.npy    (n, D) unit-norm embeddings, float16 or float32, ``np.load(mmap_mode=...)``
    EMB_DIR/images/part-000000.jsonl  one row per embedding row: {"id", "path", "source", "index"}
    EMB_DIR/images/failed.jsonl       {"id", "reason"} of images that did not decode in the last run
    EMB_DIR/texts/part-*.npy|jsonl    the same for captions: {"id": caption}
    EMB_DIR/.lock                     held (``flock``) by the one process writing the folder

Embeddings are appended as *parts*: a part's ``.npy`` is written first and its ``.jsonl`` last, each to a
temporary name and renamed into place, so a part exists (is committed) exactly when its table does. A
crashed run leaves whole parts behind and the next run skips the ids they hold (resume). Row ``r`` of the
store is row ``r - offset`` of the part that holds it, parts taken in name order.

A writer holds :func:`writer_lock` for its whole run, so two runs never append the same ids twice. Small
parts (a run commits one every few hundred images, so an interruption loses seconds of work) are merged
by :meth:`EmbeddingStore.merge_parts` into one part with the same rows in the same order: every memory-mapped
part holds a file descriptor and is one more block for a search to step through.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is then not protected against a second writer
    fcntl = None

from clipforge.io import atomic_write
from clipforge.version import __version__

FORMAT = "clipforge-embeddings"
FORMAT_VERSION = 1
KINDS = ("images", "texts")
DTYPES = ("float16", "float32")
LOCK_NAME = ".lock"
_STAGED_TABLE = "merge-{number:06d}.jsonl"  # a merged part's table before it is committed


class StoreBusyError(ValueError):
    """Another process holds the embedding folder's write lock (another ``clipforge embed`` is writing it)."""


@contextlib.contextmanager
def writer_lock(root: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive write lock of the embedding folder ``root`` (created if missing) inside the block.

    ``flock(LOCK_EX | LOCK_NB)`` on ``root/.lock``: a second writer fails at once with ``StoreBusyError``
    instead of waiting or appending the same ids again. The kernel drops the lock when its holder exits,
    killed or not, so no stale lock is ever left behind to clean up.
    """
    root = Path(root)
    if root.is_file():
        raise FileExistsError(f"--out {str(root)!r} is a file; expected a folder for the embeddings")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a+b") as handle:  # closing the file releases the lock
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusyError(
                    f"another `clipforge embed` is writing {root} (it holds {root / LOCK_NAME}); "
                    "wait for it to finish, or embed into another --out"
                ) from None
        yield root


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
        check_dtype(dtype)
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
        path = folder / f"part-{_next_part_number(folder):06d}.npy"
        array = np.ascontiguousarray(embeddings, dtype=self.meta["dtype"])
        atomic_write(path, lambda handle: np.save(handle, array))
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        atomic_write(path.with_suffix(".jsonl"), lambda handle: handle.write(lines))
        return path

    def merge_parts(self, kind: str, parts: list[Path]) -> Path:
        """Replace ``parts`` (the newest committed parts of ``kind``, in order) by one part holding their rows
        in the same order, so row numbers do not change. Call it only while holding :func:`writer_lock`.

        Never duplicates a row: the merged part's embeddings and its table are written first under names no
        reader takes, then ``parts`` are uncommitted (their tables removed) and the merged table is renamed
        into place. A crash in between (a few renames) uncommits those rows, which the next run embeds again.
        """
        if len(parts) < 2:
            return parts[0]
        committed = self.part_paths(kind)
        if committed[-len(parts) :] != list(parts):
            raise ValueError("merge_parts merges the newest parts only: merging older ones would renumber rows")
        folder = self.root / kind
        number = _next_part_number(folder)
        merged = folder / f"part-{number:06d}.npy"
        array = np.concatenate([np.load(part) for part in parts])  # a few thousand rows: small
        atomic_write(merged, lambda handle: np.save(handle, array))
        lines = b"".join(part.with_suffix(".jsonl").read_bytes() for part in parts)
        staged = atomic_write(folder / _STAGED_TABLE.format(number=number), lambda handle: handle.write(lines))
        for part in parts:
            part.with_suffix(".jsonl").unlink()
        os.replace(staged, merged.with_suffix(".jsonl"))
        for part in parts:
            part.unlink()
        return merged

    def remove_uncommitted(self, kind: str) -> None:
        """Delete what a crashed writer left half done: parts' embeddings without a table, staged merges.
        Call it only while holding :func:`writer_lock` (a live writer's part is uncommitted for a moment)."""
        folder = self.root / _check_kind(kind)
        if not folder.is_dir():
            return
        for path in folder.glob("part-*.npy"):
            if not path.with_suffix(".jsonl").is_file():
                path.unlink()
        for path in folder.glob(_STAGED_TABLE.replace("{number:06d}", "*")):
            path.unlink()

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


def _next_part_number(folder: Path) -> int:
    """One more than any part number in ``folder``, committed or not (a live writer's half-written part too)."""
    taken = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.*") if p.stem.split("-")[1].isdigit()]
    return max(taken, default=-1) + 1


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(DTYPES)}")
    return dtype


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {list(KINDS)}")
    return kind
