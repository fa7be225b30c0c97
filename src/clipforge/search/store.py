"""The embedding folder ``clipforge embed`` writes and ``clipforge search``/``serve`` read.

Layout::

    EMB_DIR/meta.json                 format stamp, the model (checkpoint, step, fingerprint), dtype, sources
    EMB_DIR/images/part-000000.npy    (n, D) unit-norm embeddings, float16 or float32, ``np.load(mmap_mode=...)``
    EMB_DIR/images/part-000000.jsonl  one row per embedding row: {"id", "path", "source", "index"}
    EMB_DIR/images/failed.jsonl       {"id", "reason"} of images that did not decode in the last run
    EMB_DIR/images/plan-000000.npz    an unfinished run's layout (``clipforge.search.plan``), until it ends
    EMB_DIR/texts/part-*.npy|jsonl    the same for captions: {"id": caption}
    EMB_DIR/.clipforge.lock           held (``flock``) by the one process writing the folder

Embeddings are appended as *parts*: a part's ``.npy`` is written first and its ``.jsonl`` last, each to a
temporary name and renamed into place, so a part exists (is committed) exactly when its table does. A
crashed run leaves whole parts behind and the next run skips the ids they hold (resume). Row ``r`` of the
store is row ``r - offset`` of the part that holds it, parts taken in name order (``part-000003`` or, written
by a run laid out in blocks, ``part-000003-000001``; see ``clipforge.search.plan``).

A writer holds :func:`writer_lock` for its whole run, so two runs never append the same ids twice; an
``index build`` holds it too. A run of several processes (``torchrun ... embed``) is one writer: its rank 0
holds the lock, and each process writes only the parts its plan names. ``meta.json`` changes only through :meth:`EmbeddingStore.update_meta`: under the
lock, on a fresh read, so a change by another process (a source added, an index recorded) is never lost. Small
parts (a run commits one every few hundred images, so an interruption loses seconds of work) are merged
by :meth:`EmbeddingStore.merge_parts` into one part with the same rows in the same order: every memory-mapped
part holds a file descriptor and is one more block for a search to step through.

Reading checks what it reads (``meta.json``'s fields, each part's shape and dtype, each table line, rows per
part): a damaged folder raises :class:`StoreError` naming the file and the fix, never a traceback or rows
that belong to other embeddings.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.io import atomic_write
from clipforge.search.meta import (
    StoreError,
    check_dtype,
    check_meta,
    is_int,
    meta_lock,
    new_meta,
    read_meta,
    write_meta,
)

KINDS = ("images", "texts")
_STAGED_TABLE = "merge-{name}.jsonl"  # a merged part's table before it is committed
_PART_FIX = "delete it and its .jsonl (or .npy), then run `clipforge embed` again to embed those items anew"


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
        # a snapshot for reading; every change goes through update_meta, which reads the file afresh
        self.meta: dict[str, Any] = read_meta(self.root)

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
        if root.is_file():
            raise FileExistsError(f"--out {str(root)!r} is a file; expected a folder for the embeddings")
        if not (root / "meta.json").is_file():
            with meta_lock(root):  # held already by an embed run; else two creators would race
                if not (root / "meta.json").is_file():
                    write_meta(root, new_meta(model_info, dtype))
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
        """The number of image source ``spec`` in ``meta["sources"]``, adding it (through :meth:`update_meta`) if
        new. Numbers never change: sources are only ever appended."""

        def add(meta: dict[str, Any]) -> None:
            if spec not in meta["sources"]:
                meta["sources"].append(spec)

        return self.update_meta(add)["sources"].index(spec)

    def update_meta(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` (it edits the dict in place) to ``meta.json`` as one step no other writer interleaves
        with, and return the result (also ``self.meta`` from then on).

        Under :func:`writer_lock` (nested when this thread holds it already; else waiting up to ``META_WAIT_S``
        for another process's update, then ``FolderBusyError``), ``meta.json`` is read afresh, ``change`` is
        applied to that copy, the result is checked like a read one, and it is written atomically when it
        differs. Changing a copy read before the lock would drop what another process saved in between: a
        source added by ``embed`` while ``index build`` recorded its index was lost that way.
        """
        with meta_lock(self.root):
            meta = read_meta(self.root)
            before = json.dumps(meta, sort_keys=True)
            change(meta)
            check_meta(meta, self.root / "meta.json")
            if json.dumps(meta, sort_keys=True) != before:
                write_meta(self.root, meta)
            self.meta = meta
        return meta

    def reload_meta(self) -> dict[str, Any]:
        """Read ``meta.json`` again (what another process saved since this store was opened)."""
        self.meta = read_meta(self.root)
        return self.meta

    # -- parts ----------------------------------------------------------------------------------------
    def part_paths(self, kind: str) -> list[Path]:
        """The committed parts' ``.npy`` files of ``kind``, in order (a part is committed once its table is)."""
        folder = self.root / _check_kind(kind)
        if not folder.is_dir():
            return []
        # is_file: a folder or a pipe under a part's name would fail (or block) np.load
        return sorted(p for p in folder.glob("part-*.npy") if p.is_file() and p.with_suffix(".jsonl").is_file())

    def open_part(self, path: Path, mmap_mode: str = "r") -> np.ndarray:
        """The (n, D) embeddings of the part ``path``, memory-mapped; StoreError when it is not a .npy file of
        the store's dtype and width (truncated, another array, pickled objects).

        Memory-mapping checks the file holds every byte its header promises before anything is read, so a
        header that claims more rows than the file has never allocates them."""
        try:
            matrix = np.load(path, mmap_mode=mmap_mode)  # allow_pickle stays False: no code runs from a part
        except Exception as error:  # noqa: BLE001 - numpy's header parser raises ValueError, EOFError, tokenize's
            # TokenError, SyntaxError ... for damaged bytes: whichever it is, the part cannot be read
            raise StoreError(f"{path} is not a readable embedding part ({error!r:.200}): {_PART_FIX}") from None
        dtype, width = np.dtype(self.meta["dtype"]), self.meta["model"].get("embed_dim")
        if matrix.ndim != 2 or matrix.dtype != dtype or (width is not None and matrix.shape[1] != width):
            expected = f"(rows, {width})" if width is not None else "(rows, D)"
            raise StoreError(
                f"{path} holds a {matrix.dtype} array of shape {matrix.shape}; this folder's parts are {expected} "
                f"{dtype}: {_PART_FIX}"
            )
        return matrix

    def write_part(
        self, kind: str, embeddings: np.ndarray, rows: list[dict[str, Any]], name: str | None = None
    ) -> Path:
        """Commit one part: ``embeddings`` (n, D) in the store's dtype and its n table ``rows``. ``name`` (a
        ``part-...`` stem that sorts where its rows belong: a plan's) or, by default, the next number: appended."""
        if len(embeddings) != len(rows):
            raise ValueError(f"{len(embeddings)} embeddings but {len(rows)} rows")
        width = self.meta["model"].get("embed_dim")
        if np.ndim(embeddings) != 2 or (width is not None and np.shape(embeddings)[1] != width):
            raise ValueError(f"embeddings of shape {np.shape(embeddings)}: this folder stores (n, {width}) rows")
        folder = self.root / _check_kind(kind)
        folder.mkdir(exist_ok=True)
        path = folder / f"{name or f'part-{next_part_number(folder):06d}'}.npy"
        array = np.ascontiguousarray(embeddings, dtype=self.meta["dtype"])
        atomic_write(path, lambda handle: np.save(handle, array))
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        atomic_write(path.with_suffix(".jsonl"), lambda handle: handle.write(lines))
        return path

    def merge_parts(self, kind: str, parts: list[Path], into: str) -> Path:
        """Replace the committed ``parts`` (in order) by one part named ``into`` holding their rows in the same
        order. ``into`` must sort where ``parts`` do (a plan's block holding its chunks), so no row of another
        part changes its number. Call it only while the folder's writer (or a process of its run) writes it.

        Never duplicates a row: the merged part's embeddings and its table are written first under names no
        reader takes, then ``parts`` are uncommitted (their tables removed) and the merged table is renamed
        into place. A crash in between (a few renames) uncommits those rows, which the next run embeds again.
        """
        folder = self.root / _check_kind(kind)
        merged = folder / f"{into}.npy"
        if list(parts) == [merged]:
            return merged
        array = np.concatenate([self.open_part(part) for part in parts])  # a few thousand rows: small
        atomic_write(merged, lambda handle: np.save(handle, array), replace=True)
        lines = b"".join(part.with_suffix(".jsonl").read_bytes() for part in parts)
        staged = atomic_write(
            folder / _STAGED_TABLE.format(name=into), lambda handle: handle.write(lines), replace=True
        )
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
        for path in folder.glob(_STAGED_TABLE.replace("{name}", "*")):
            path.unlink()

    def matrices(self, kind: str, mmap: bool = True) -> list[np.ndarray]:
        """Each part's (n, D) embeddings, memory-mapped (copy-on-write, so torch can wrap them without a copy);
        StoreError when a part is damaged or the parts differ in width."""
        parts = self.part_paths(kind)
        allow_open_files(len(parts))
        matrices = [self.open_part(path, "c") for path in parts]
        if len({matrix.shape[1] for matrix in matrices}) > 1:
            raise StoreError(f"the {kind} parts of {self.root} differ in width: {_PART_FIX}")
        return matrices if mmap else [np.array(matrix) for matrix in matrices]

    def table(self, kind: str) -> StoreTable:
        """All rows of ``kind`` in store order; StoreError (naming the file and line) for a line that is not a
        row object, and for a table whose rows are not as many as its part's embeddings (every later row
        would be shown with another row's id)."""
        ids, paths, sources, indices = [], [], [], []
        for rows in self.tables(kind):
            for identifier, path, source, index in rows:
                ids.append(identifier)
                paths.append(path)
                sources.append(source)
                indices.append(index)
        return StoreTable(ids, paths, np.asarray(sources, dtype=np.int64), np.asarray(indices, dtype=np.int64))

    def tables(self, kind: str) -> Iterator[list[tuple[str, str, int, int]]]:
        """Each part's rows (id, path, source, index), checked as :meth:`table` checks them, one part at a time:
        a folder of any size is checked in the memory of its largest part."""
        for part in self.part_paths(kind):
            table = part.with_suffix(".jsonl")
            rows = [_check_row(row, table, number) for number, row in _json_lines(table)]
            embedded = self.open_part(part).shape[0]
            if len(rows) != embedded:
                raise StoreError(
                    f"{table} lists {len(rows)} rows but {part.name} holds {embedded} embeddings: {_PART_FIX}"
                )
            yield rows

    def count(self, kind: str) -> int:
        return sum(self.open_part(path).shape[0] for path in self.part_paths(kind))

    # -- failures -------------------------------------------------------------------------------------
    def failures_path(self, kind: str) -> Path:
        return self.root / _check_kind(kind) / "failed.jsonl"

    def reset_failures(self, kind: str, keep_run: int | None = None) -> None:
        """Start a run's failure list afresh: every run retries the items that failed before. ``keep_run``: the
        number of a plan taken up again, whose blocks' lists stay (those blocks are not embedded again)."""
        self.failures_path(kind).unlink(missing_ok=True)
        for path in self._block_failure_files(kind):
            if keep_run is None or not path.name.startswith(f"failed-{keep_run:06d}-"):
                path.unlink(missing_ok=True)

    def write_block_failures(self, kind: str, block: str, failures: list[dict[str, str]]) -> None:
        """The failures of one block of a plan (``block``: its part name), each block in its own file, so the
        processes of a run never write one file together."""
        lines = "".join(json.dumps(failure, ensure_ascii=False) + "\n" for failure in failures).encode("utf-8")
        path = self.root / _check_kind(kind) / f"failed-{block.removeprefix('part-')}.jsonl"
        atomic_write(path, lambda handle: handle.write(lines), replace=True)

    def gather_failures(self, kind: str, run: int) -> list[dict[str, str]]:
        """Move the block failure lists of the plan ``run`` into ``failed.jsonl`` (after what it lists), in block
        order: the same file whatever the number of processes. Returns the failures moved."""
        blocks = [path for path in self._block_failure_files(kind) if path.name.startswith(f"failed-{run:06d}-")]
        moved = [failure for path in blocks for failure in self._read_failures(path)]
        if moved:
            earlier = self.failures_path(kind).read_bytes() if self.failures_path(kind).is_file() else b""
            lines = earlier + "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in moved).encode("utf-8")
            atomic_write(self.failures_path(kind), lambda handle: handle.write(lines), replace=True)
        for path in blocks:
            path.unlink()
        return moved

    def failures(self, kind: str) -> list[dict[str, str]]:
        """The failures of the last run: ``failed.jsonl``, then those of an unfinished run's blocks."""
        return [
            failure
            for path in [self.failures_path(kind), *self._block_failure_files(kind)]
            for failure in self._read_failures(path)
        ]

    def _block_failure_files(self, kind: str) -> list[Path]:
        folder = self.root / _check_kind(kind)
        return sorted(folder.glob("failed-*.jsonl")) if folder.is_dir() else []

    @staticmethod
    def _read_failures(path: Path) -> list[dict[str, str]]:
        if not path.is_file():
            return []
        fix = "delete it: the next `clipforge embed` lists its failures again"
        return [failure for _, failure in _json_lines(path, fix) if isinstance(failure, dict)]


def _json_lines(path: Path, fix: str = _PART_FIX) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSON-lines file; StoreError naming the file and the
    line for one that is not JSON or not UTF-8."""
    number = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):  # noqa: B007 - the number is named in the error
                if line.strip():
                    yield number, json.loads(line)
    except OSError as error:
        raise StoreError(f"{path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise StoreError(f"{path} is not UTF-8 text (after line {number}): {fix}") from None
    except (ValueError, RecursionError) as error:
        raise StoreError(f"{path} line {number} is not JSON ({error}): {fix}") from None


def _check_row(row: Any, path: Path, number: int) -> tuple[str, str, int, int]:
    """(id, path or "", source number or -1, index or -1) of one table row; StoreError if it is not a row."""
    if isinstance(row, dict):
        fields = (row.get("id"), row.get("path") or "", row.get("source", -1), row.get("index", -1))
        if isinstance(fields[0], str) and isinstance(fields[1], str) and is_int(fields[2]) and is_int(fields[3]):
            return fields[0], fields[1], int(fields[2]), int(fields[3])
    raise StoreError(
        f"{path} line {number} is not a row (an object with a string 'id', and whole-number 'source' and "
        f"'index' if any): {json.dumps(row)[:80]}; {_PART_FIX}"
    )


def allow_open_files(maps: int) -> None:
    """Raise this process's limit on open files (its soft limit, up to the hard one) to hold ``maps`` memory maps
    and as many other files: each map keeps a file descriptor (Python's ``mmap`` holds a copy of it), and 10M rows
    in parts of 2048 are ~4,900 maps, over the common soft limit of 1,024."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * maps + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def next_part_number(folder: Path) -> int:
    """One more than any part or plan number in ``folder``, committed or not (a live writer's half-written part,
    an unfinished run's plan too)."""
    names = [p.stem.split("-") for pattern in ("part-*.*", "plan-*.*") for p in folder.glob(pattern)]
    return max((int(name[1]) for name in names if name[1].isdigit()), default=-1) + 1


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {list(KINDS)}")
    return kind
