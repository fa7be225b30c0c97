"""One embedding run laid out in parts that any number of processes fill alike (``torchrun ... embed``).

A run embeds ``positions``: the input's items not yet in the store, in input order. They are cut into *chunks* of
``chunk_size`` items (what is committed at once: ``--flush-every``) and consecutive chunks into *blocks* of
``chunks_per_block`` (what becomes one stored part: ``--part-rows``). Block ``b`` is embedded by process
``b mod N``: a deterministic split by row that does not depend on the items' cost. Its chunks are committed as
parts ``part-RRRRRR-BBBBBB-CCCCCC`` and, once all are embedded, merged into ``part-RRRRRR-BBBBBB`` (a block of one
chunk is written under that name at once), where ``RRRRRR`` is the run's number: one more than any part or plan
in the folder when the run began. Parts are read in name order, so the store's rows come in input order whatever
N: one process or eight write the same files, row for row, and bit for bit where the model computes a chunk alike
(each chunk goes through the same batches on every N).

The plan is saved first, as ``<kind>/plan-RRRRRR.npz`` (the positions, the layout and a SHA-256 of the items'
ids), and removed once every process has finished. A stopped run leaves it, and the next run over the same input
(the same ids at the same positions) takes it up: a block whose part is committed is skipped, and in a block
begun only the chunks not committed are embedded, so an interrupted process redoes only its unfinished parts and
the store ends as an uninterrupted run leaves it. A plan of another input, or of an input that has changed since,
is dropped: its committed parts stay, and what it did not embed is embedded by the next run over that input.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipforge.io import atomic_write
from clipforge.search.store import EmbeddingStore, next_part_number

logger = logging.getLogger("clipforge")

PLAN_PATTERN = "plan-*.npz"


def ids_digest(ids: Iterable[str]) -> str:
    """SHA-256 over the ids in order, each with its length, so no two lists of ids share a digest by how they
    are cut."""
    digest = hashlib.sha256()
    for identifier in ids:
        data = identifier.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


@dataclass(frozen=True)
class EmbedPlan:
    """The layout of one run (module docstring): ``run`` its number, ``source`` its input's number in
    ``meta["sources"]`` (-1 for captions), ``positions`` (M,) the items to embed in store order, ``digest`` the
    :func:`ids_digest` of their ids."""

    run: int
    source: int
    positions: np.ndarray
    chunk_size: int
    chunks_per_block: int
    digest: str

    @property
    def file_name(self) -> str:
        return f"plan-{self.run:06d}.npz"

    @property
    def block_rows(self) -> int:
        return self.chunk_size * self.chunks_per_block

    def __len__(self) -> int:
        """The number of blocks."""
        return math.ceil(len(self.positions) / self.block_rows)

    def blocks_for(self, rank: int, world_size: int) -> range:
        """The blocks process ``rank`` of ``world_size`` embeds: ``rank``, ``rank + N``, ..."""
        return range(rank, len(self), world_size)

    def chunks(self, block: int) -> list[np.ndarray]:
        """The positions of each chunk of ``block``, in order."""
        start = block * self.block_rows
        items = self.positions[start : start + self.block_rows]
        return [items[offset : offset + self.chunk_size] for offset in range(0, len(items), self.chunk_size)]

    def part_name(self, block: int, chunk: int | None = None) -> str:
        """The part ``block`` is stored as, or (``chunk``) the part of one of its chunks before the merge; a block
        of one chunk has no chunk parts."""
        name = f"part-{self.run:06d}-{block:06d}"
        return name if chunk is None or len(self.chunks(block)) == 1 else f"{name}-{chunk:06d}"

    def save(self, folder: Path) -> Path:
        """Write the plan to ``folder`` (whole or not at all)."""
        layout = np.array([self.run, self.source, self.chunk_size, self.chunks_per_block], dtype=np.int64)
        arrays = {"positions": self.positions, "layout": layout, "digest": np.array(self.digest)}
        return atomic_write(folder / self.file_name, lambda handle: np.savez(handle, **arrays), replace=True)

    @classmethod
    def load(cls, path: Path) -> EmbedPlan | None:
        """The plan saved at ``path``; None when it is not one this module wrote whole (it is then dropped)."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                positions, layout, digest = saved["positions"], saved["layout"], str(saved["digest"])
        except Exception:  # noqa: BLE001 - zipfile, numpy's header parser ... each raise their own for damaged bytes
            return None
        if positions.ndim != 1 or positions.dtype != np.int64 or layout.shape != (4,) or len(digest) != 64:
            return None
        run, source, chunk_size, chunks_per_block = (int(value) for value in layout)
        if f"plan-{run:06d}.npz" != path.name or chunk_size < 1 or chunks_per_block < 1:
            return None
        return cls(run, source, positions, chunk_size, chunks_per_block, digest)


# a run is cut into at least this many blocks where its chunks allow: blocks are the unit of work dealt to the
# processes, so a short run of one block would keep all but one process idle (2,000 images in one 2,048-row block
# ran no faster on 2 processes than on 1). A count, not a function of N: the layout stays the same on any N. Runs
# longer than MIN_BLOCKS full parts (--part-rows) are not affected.
MIN_BLOCKS = 4


def new_plan(folder: Path, source: int, positions: Iterable[int], ids: list[str], chunk_size: int, part_rows: int):
    """A plan for the items ``positions`` (whose ids are ``ids``) of input ``source``, numbered after everything in
    ``folder``: chunks of ``chunk_size``, blocks of about ``part_rows`` rows (at least one chunk), fewer rows where
    that gives :data:`MIN_BLOCKS` blocks (a short run)."""
    positions = np.asarray(list(positions), dtype=np.int64)
    chunks = math.ceil(len(positions) / chunk_size)
    chunks_per_block = max(1, min(part_rows // chunk_size, chunks // MIN_BLOCKS))
    return EmbedPlan(next_part_number(folder), source, positions, chunk_size, chunks_per_block, ids_digest(ids))


def pending_plan(folder: Path, source: int, ids_at: Callable[[np.ndarray], list[str] | None]) -> EmbedPlan | None:
    """The unfinished plan of input ``source`` in ``folder`` whose items still have the ids it was made for
    (``ids_at(positions)``: their ids now, or None when some position is past the input's end); every other plan
    file there is removed (the runs it laid out cannot be taken up: their committed parts stay)."""
    found = None
    for path in sorted(folder.glob(PLAN_PATTERN)) if folder.is_dir() else []:
        plan = EmbedPlan.load(path)
        if found is None and plan is not None and plan.source == source:
            ids = ids_at(plan.positions)
            if ids is not None and ids_digest(ids) == plan.digest:
                found = plan
                continue
        logger.info("dropping %s: the run it laid out cannot be taken up (its committed parts stay)", path.name)
        path.unlink(missing_ok=True)
    return found


class Work(Protocol):
    """What a plan's items are: ``embed(positions)`` gives (embeddings (n, D), the n table rows, failures
    ``{"id", "reason"}``) for the items at ``positions``, n of them embedded."""

    kind: str

    def embed(self, positions: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, str]]]: ...


def committed(folder: Path, name: str) -> bool:
    """Part ``name`` is committed: its table exists (written after its embeddings)."""
    return (folder / f"{name}.jsonl").is_file() and (folder / f"{name}.npy").is_file()


def execute(
    plan: EmbedPlan, store: EmbeddingStore, work: Work, rank: int, world_size: int, advance: Callable[[int], Any]
) -> int:
    """Embed this process's blocks of ``plan`` into ``store`` (skipping what is committed); returns the items
    embedded. ``advance(n)`` is told each chunk's items as they are done (a progress bar)."""
    folder = store.root / work.kind
    embedded = 0
    for block in plan.blocks_for(rank, world_size):
        chunks = plan.chunks(block)
        if committed(folder, plan.part_name(block)):
            advance(sum(len(chunk) for chunk in chunks))
            continue
        parts, failures = [], []
        for number, positions in enumerate(chunks):
            name = plan.part_name(block, number)
            if not committed(folder, name):
                embeddings, rows, failed = work.embed(positions)
                failures += failed
                if rows:
                    store.write_part(work.kind, embeddings, rows, name=name)
                    embedded += len(rows)
            if committed(folder, name):
                parts.append(folder / f"{name}.npy")
            advance(len(positions))
        if failures:
            store.write_block_failures(work.kind, plan.part_name(block), failures)
        if parts:
            store.merge_parts(work.kind, parts, into=plan.part_name(block))
    return embedded
