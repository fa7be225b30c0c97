"""``clipforge embed``: unit-norm embeddings of images (or captions) into an embedding folder, resumably, by one
process or many (``torchrun --nproc-per-node N -m clipforge embed ...``).

The items not yet in the store are laid out by a plan (``clipforge.search.plan``): chunks of ``chunk_size`` items
(``--flush-every``; 256 images, a few seconds of work, so an interruption loses little), each embedded by the
evaluation code (``encode_source_images`` / ``encode_texts``: batched, evaluation transform) and committed as one
part of the store (``clipforge.search.store``), and blocks of chunks merged into parts of about ``part_rows`` rows.
Block ``b`` goes to process ``b mod N``, so the store holds the same rows, in the same order, whatever N. Items
whose id is already in the store are skipped, so a run that was stopped, or a folder that gained files, costs
only the new items; a stopped run's plan is taken up again, so its processes redo only their unfinished parts.
Images that fail to decode are listed in ``images/failed.jsonl`` (and retried by the next run), never fatal.

One run writes a folder at a time: its rank 0 holds the folder's write lock (``meta.writer_lock``) and alone
changes ``meta.json``, so a second run into the same folder fails at once instead of appending the same images
again; the other processes write only the parts their plan names. Rank 0 prepares each plan and passes it (or its
error) to the others; every process checks that it reads the same items (the plan's digest of their ids).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch

from clipforge.config.choices import FLUSH_EVERY, PART_ROWS
from clipforge.data.base import DataError, ImageLoadError, ImageTextSource
from clipforge.data.inputs import open_image_source, read_texts, resolve_image_spec, source_names_files
from clipforge.data.samples import SkippedSample
from clipforge.distributed import DistributedContext, broadcast_object, close_distributed, gather_ints, init_distributed
from clipforge.eval.features import encode_source_images, encode_texts
from clipforge.io import sweep_stale_temporaries, weights_fingerprint
from clipforge.model.factory import LoadedModel
from clipforge.search import plan as plans
from clipforge.search.meta import check_dtype, writer_lock
from clipforge.search.store import EmbeddingStore
from clipforge.train.run_log import progress_bar

logger = logging.getLogger("clipforge")

T = TypeVar("T")
EmbedWork = Union["_ImageWork", "_TextWork"]  # what a run embeds (a plan's ``Work``)


@dataclass
class EmbedReport:
    """What one run did: items embedded now (by every process), items already in the store, failures (id,
    reason)."""

    store: Path
    kind: str
    embedded: int
    already_done: int
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # embedding (every process, from the first plan to the last part), not opening the input


class _Subset:
    """Positions ``indices`` of a source, as a source (one chunk of the work)."""

    labels = None
    classnames = None

    def __init__(self, source: ImageTextSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, index: int):
        return self.source.load_image(self.indices[index])

    def captions(self, index: int) -> list[str]:
        return self.source.captions(self.indices[index])

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[index])


def model_info(loaded: LoadedModel, checkpoint: str | os.PathLike) -> dict:
    """How an embedding folder records the model that filled it."""
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "step": loaded.step,
        "fingerprint": weights_fingerprint(loaded.model),
        "embed_dim": loaded.config.model.embed_dim,
    }


def _encode_chunk(loaded: LoadedModel, chunk: _Subset, batch_size: int, num_workers: int):
    """(features (n_ok, D), positions of the n_ok in the chunk, skipped samples) for one chunk."""
    try:
        result = encode_source_images(
            loaded.model, chunk, loaded.processor, batch_size=batch_size, num_workers=num_workers
        )
    except ValueError as error:
        # encode_source_images refuses a set where nothing decodes; for one chunk of a large run that is
        # just a chunk of bad files, so name each one (re-raising if one does load: then it was another error)
        skipped = []
        for position in range(len(chunk)):
            try:
                chunk.load_image(position)
            except ImageLoadError as error:
                skipped.append(SkippedSample(chunk.describe(position), str(error)))
            else:
                raise error
        return torch.empty(0, loaded.config.model.embed_dim), np.empty(0, dtype=np.int64), skipped
    return result.features, result.indices, result.skipped


# ----------------------------------------------------------------------------------------------
# What is embedded: images of a source, or captions (a plan's ``Work``)
# ----------------------------------------------------------------------------------------------
@dataclass
class _ImageWork:
    """The images of ``source`` (input number ``source_number`` of the folder). Row contract: each stored row is
    ``{"id": source.describe(i), "path": the file or "", "source": source_number, "index": i}``."""

    loaded: LoadedModel
    source: ImageTextSource
    batch_size: int
    num_workers: int
    source_number: int = -1
    kind: str = "images"

    def ids(self) -> list[str]:
        return [self.source.describe(index) for index in range(len(self.source))]

    def ids_at(self, positions: np.ndarray) -> list[str] | None:
        if len(positions) and not 0 <= int(positions.min()) <= int(positions.max()) < len(self.source):
            return None
        return [self.source.describe(int(index)) for index in positions]

    def embed(self, positions: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, str]]]:
        chunk = _Subset(self.source, positions.tolist())
        features, kept, skipped = _encode_chunk(self.loaded, chunk, self.batch_size, self.num_workers)
        names_files = source_names_files(self.source)
        rows = []
        for position in kept:
            index = chunk.indices[int(position)]
            identifier = self.source.describe(index)
            rows.append(
                {
                    "id": identifier,
                    "path": identifier if names_files else "",
                    "source": self.source_number,
                    "index": index,
                }
            )
        return features.cpu().numpy(), rows, [{"id": s.where, "reason": s.reason} for s in skipped]


@dataclass
class _TextWork:
    """Captions, each its own id (row ``{"id": caption}``)."""

    loaded: LoadedModel
    captions: list[str]
    batch_size: int
    source_number: int = -1
    kind: str = "texts"

    def ids(self) -> list[str]:
        return self.captions

    def ids_at(self, positions: np.ndarray) -> list[str] | None:
        if len(positions) and not 0 <= int(positions.min()) <= int(positions.max()) < len(self.captions):
            return None
        return [self.captions[int(index)] for index in positions]

    def embed(self, positions: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, str]]]:
        chunk = [self.captions[int(index)] for index in positions]
        features = encode_texts(self.loaded.model, self.loaded.processor, chunk, batch_size=self.batch_size)
        return features.cpu().numpy(), [{"id": caption} for caption in chunk], []


# ----------------------------------------------------------------------------------------------
# The public functions
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def embedding_processes(device: torch.device) -> Iterator[DistributedContext]:
    """The processes of this embedding run: under torchrun a process group (each process on its own device,
    ``cuda:LOCAL_RANK`` for CUDA), else this process alone. The group is closed at the end, without waiting for
    the others after an error (they may never arrive)."""
    context = init_distributed(device, field="--device")
    try:
        yield context
    except BaseException:
        close_distributed(context, wait=False)
        raise
    close_distributed(context)


def embed_images(
    loaded: LoadedModel,
    checkpoint: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float16",
    batch_size: int = 64,
    chunk_size: int = FLUSH_EVERY,
    num_workers: int = 0,
    progress: bool = True,
    part_rows: int = PART_ROWS,
    context: DistributedContext | None = None,
) -> EmbedReport:
    """Embed every image ``images`` names (folder, manifest, data config, shards) into the folder ``out``,
    committing a part every ``chunk_size`` images (an interruption loses at most that many per process) and
    merging them into parts of about ``part_rows`` rows.

    ``context``: this process's place in a run of several (``embedding_processes``); every process of the run
    calls this with the same arguments, and each embeds its share. Rows: see ``_ImageWork``.
    """
    _check_sizes(chunk_size, part_rows)
    check_dtype(dtype)
    spec = resolve_image_spec(images)
    work = _ImageWork(loaded, open_image_source(spec), batch_size, num_workers)
    report = _embed(work, out, model_info(loaded, checkpoint), dtype, spec, chunk_size, part_rows, context, progress)
    for failure in report.failed[:20]:
        logger.warning("could not embed %s", failure["reason"])
    return report


def embed_text_file(
    loaded: LoadedModel,
    checkpoint: str | os.PathLike,
    texts: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float16",
    batch_size: int = 256,
    chunk_size: int = 8192,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> EmbedReport:
    """Embed the captions of a text file (one per line) into ``out/texts``; a caption is its own id. Each chunk of
    ``chunk_size`` captions is one part (``context``: as for :func:`embed_images`)."""
    _check_sizes(chunk_size, chunk_size)
    check_dtype(dtype)
    captions = list(dict.fromkeys(read_texts(texts)))  # an identical caption has an identical embedding
    work = _TextWork(loaded, captions, batch_size)
    return _embed(work, out, model_info(loaded, checkpoint), dtype, None, chunk_size, chunk_size, context, progress)


def _check_sizes(chunk_size: int, part_rows: int) -> None:
    for name, value in (("flush every", chunk_size), ("part rows", part_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} {value!r} items: it must be a positive whole number")


# ----------------------------------------------------------------------------------------------
# One run: rank 0 prepares each plan, every process embeds its blocks
# ----------------------------------------------------------------------------------------------
def _from_main(context: DistributedContext, make: Callable[[], T]) -> T:
    """``make()`` on rank 0, its value (or the error it raised) on every rank: a mistake rank 0 finds stops every
    process with the same message, instead of leaving them waiting."""
    if not context.enabled:
        return make()
    value: Any = None
    error: BaseException | None = None
    if context.is_main:
        try:
            value = make()
        except Exception as raised:  # noqa: BLE001 - passed on to every rank, then raised here too
            error = raised
    value, passed = broadcast_object((value, error))
    if error is not None:
        raise error
    if passed is not None:
        raise passed
    return value


class _Planner:
    """Rank 0's side of a run: opens the store, takes up an unfinished plan of the same input, makes the next
    one, and gathers each finished plan's failures. Holds the big lists (every id), which the others never need."""

    def __init__(
        self,
        work: EmbedWork,
        out: str | os.PathLike,
        model: dict,
        dtype: str,
        spec: str | None,
        layout: tuple[int, int],
    ) -> None:
        self.work, self.layout = work, layout
        self.store = EmbeddingStore.open_for_model(out, model, dtype)
        self.folder = self.store.root / work.kind
        self.source_number = self.store.source_number(spec) if spec is not None else -1
        self.store.remove_uncommitted(work.kind)
        self.pending = plans.pending_plan(self.folder, self.source_number, work.ids_at)
        self.store.reset_failures(work.kind, keep_run=self.pending.run if self.pending else None)
        self.ids = work.ids()
        self.done: set[str] | None = set(self.store.table(work.kind).ids)  # None once a plan has added rows
        self.already_done = sum(identifier in self.done for identifier in self.ids)
        self.failed: list[dict[str, str]] = []
        self.planned = False  # a fresh plan was made (after it, only failures remain)

    def next_plan(self) -> str | None:
        """The file name of the next plan (saved), or None when everything is embedded or failed in this run."""
        plan, self.pending = self.pending, None
        if plan is None:
            if self.planned:  # a fresh plan covered everything missing: nothing is left but this run's failures
                return None
            self.planned = True
            done = self.done if self.done is not None else set(self.store.table(self.work.kind).ids)
            done = done | {failure["id"] for failure in self.failed}
            todo = [position for position, identifier in enumerate(self.ids) if identifier not in done]
            if not todo:
                return None
            chunk_size, part_rows = self.layout
            ids = [self.ids[position] for position in todo]
            plan = plans.new_plan(self.folder, self.source_number, todo, ids, chunk_size, part_rows)
        self.folder.mkdir(exist_ok=True)
        plan.save(self.folder)
        return plan.file_name

    def finish(self, plan: plans.EmbedPlan) -> None:
        """Every process has finished ``plan``: its failures go to ``failed.jsonl`` and the plan is removed."""
        self.failed += self.store.gather_failures(self.work.kind, plan.run)
        (self.folder / plan.file_name).unlink()
        self.done = None


def _embed(
    work: EmbedWork,
    out: str | os.PathLike,
    model: dict,
    dtype: str,
    spec: str | None,
    chunk_size: int,
    part_rows: int,
    context: DistributedContext | None,
    progress: bool,
) -> EmbedReport:
    """Run every plan of this call (an unfinished one of the same input first, then the items still missing)."""
    context = context or DistributedContext()
    planner: _Planner | None = None

    def prepare() -> tuple[int, int]:
        nonlocal planner
        planner = _Planner(work, out, model, dtype, spec, (chunk_size, part_rows))
        return planner.source_number, planner.already_done

    with writer_lock(out, "embed") if context.is_main else contextlib.nullcontext():
        work.source_number, already_done = _from_main(context, prepare)
        store = planner.store if planner is not None else EmbeddingStore(out)
        report = EmbedReport(store.root, work.kind, 0, already_done)
        folder = store.root / work.kind
        started = time.perf_counter()
        for _ in range(2):  # the plan taken up again (if any), then one for what is still missing
            name = _from_main(context, lambda: planner.next_plan())
            if name is None:
                break
            plan = _open_plan(folder / name, work, context)
            # each process sweeps the folder's stale temporaries now, before any of them writes: a process on
            # another node would otherwise take a live writer's temporary file there for a dead one's
            sweep_stale_temporaries(folder)
            gather_ints(0)
            report.embedded += sum(gather_ints(_execute(plan, store, work, context, progress)))
            if planner is not None:
                planner.finish(plan)
        report.failed = planner.failed if planner is not None else []
        report.seconds = time.perf_counter() - started
    if report.embedded and context.is_main:
        rate = report.embedded / max(report.seconds, 1e-9)
        processes = f"{context.world_size} processes" if context.enabled else "1 process"
        logger.info(
            "embedded %d %s in %.2f s: %.1f/s with %s", report.embedded, work.kind, report.seconds, rate, processes
        )
    return report


def _open_plan(path: Path, work: EmbedWork, context: DistributedContext) -> plans.EmbedPlan:
    """The plan rank 0 saved at ``path``; DataError when this process reads other items than rank 0 did (rank 0
    made the plan from its own reading)."""
    plan = plans.EmbedPlan.load(path)
    if plan is not None and context.is_main:
        return plan
    ids = work.ids_at(plan.positions) if plan is not None else None
    if ids is None or plans.ids_digest(ids) != plan.digest:
        raise DataError(
            f"process {context.rank} reads other {work.kind} than process 0 (the plan {path} does not match): every "
            "process must see the same input at the same path (on several nodes: a shared filesystem)"
        )
    return plan


def _execute(
    plan: plans.EmbedPlan, store: EmbeddingStore, work: EmbedWork, context: DistributedContext, progress: bool
) -> int:
    """This process's blocks of ``plan``, with a progress bar on rank 0 (its own share)."""
    blocks = plan.blocks_for(context.rank, context.world_size)
    share = sum(min(plan.block_rows, len(plan.positions) - block * plan.block_rows) for block in blocks)
    unit = "img" if work.kind == "images" else "text"
    where = f" (process 0 of {context.world_size})" if context.enabled else ""
    bar = progress_bar(share, f"embed {work.kind}{where}", unit, enabled=progress and context.is_main)
    with bar:
        return plans.execute(plan, store, work, context.rank, context.world_size, bar.update)
