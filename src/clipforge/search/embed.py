"""``clipforge embed``: unit-norm embeddings of images (or captions) into an embedding folder, resumably.

Work goes in chunks of ``chunk_size`` items (``--flush-every``; 256 images, a few seconds of work, so an
interrupted run loses little); each chunk is embedded by the evaluation code (``encode_source_images`` /
``encode_texts``: batched, evaluation transform) and committed as one part of the store
(``clipforge.search.store``); the run's small parts are merged into parts of about ``MERGED_PART_ROWS`` rows
as it goes. Items whose id is already in the store are skipped, so a run that was stopped, or a folder that
gained files, costs only the new items. Images that fail to decode are listed in ``images/failed.jsonl`` (and
retried by the next run), never fatal. A run holds the folder's write lock (``store.writer_lock``): a second
run into the same folder fails at once instead of appending the same images again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from clipforge.config.choices import FLUSH_EVERY
from clipforge.data.base import ImageLoadError, ImageTextSource
from clipforge.data.inputs import open_image_source, read_texts, resolve_image_spec, source_names_files
from clipforge.data.samples import SkippedSample
from clipforge.eval.features import encode_source_images, encode_texts
from clipforge.io import weights_fingerprint
from clipforge.model.factory import LoadedModel
from clipforge.search.meta import check_dtype, writer_lock
from clipforge.search.store import EmbeddingStore

logger = logging.getLogger("clipforge")

MERGED_PART_ROWS = 2048  # a run's small parts are merged once they hold this many rows


@dataclass
class EmbedReport:
    """What one run did: items embedded now, items already in the store, failures (id, reason)."""

    store: Path
    kind: str
    embedded: int
    already_done: int
    failed: list[dict[str, str]] = field(default_factory=list)


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


@dataclass
class _ImageRun:
    """What every chunk of one ``embed_images`` run writes to, and the report it adds to."""

    loaded: LoadedModel
    source: ImageTextSource
    store: EmbeddingStore
    source_number: int
    report: EmbedReport
    batch_size: int
    num_workers: int

    def embed_chunk(self, indices: Sequence[int]) -> Path | None:
        """Embed the source's images ``indices`` and commit them as one part (None when none decoded)."""
        chunk = _Subset(self.source, indices)
        features, positions, skipped = _encode_chunk(self.loaded, chunk, self.batch_size, self.num_workers)
        failures = [{"id": s.where, "reason": s.reason} for s in skipped]
        self.store.add_failures("images", failures)
        self.report.failed.extend(failures)
        if not len(positions):
            return None
        names_files = source_names_files(self.source)
        rows = [self._row(chunk.indices[int(position)], names_files) for position in positions]
        self.report.embedded += len(rows)
        return self.store.write_part("images", features.cpu().numpy(), rows)

    def _row(self, index: int, names_files: bool) -> dict:
        identifier = self.source.describe(index)
        return {
            "id": identifier,
            "path": identifier if names_files else "",
            "source": self.source_number,
            "index": index,
        }


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
) -> EmbedReport:
    """Embed every image ``images`` names (folder, manifest, data config, shards) into the folder ``out``,
    committing a part every ``chunk_size`` images (an interruption loses at most that many).

    Row contract: each stored row is ``{"id": source.describe(i), "path": the file or "", "source": number
    of the input in meta["sources"], "index": i}`` beside its unit-norm embedding.
    """
    _check_chunk_size(chunk_size)
    check_dtype(dtype)
    spec = resolve_image_spec(images)
    source = open_image_source(spec)
    with writer_lock(out):
        store = EmbeddingStore.open_for_model(out, model_info(loaded, checkpoint), dtype)
        store.remove_uncommitted("images")
        done = set(store.table("images").ids)
        todo = [i for i in range(len(source)) if source.describe(i) not in done]
        store.reset_failures("images")
        report = EmbedReport(store.root, "images", 0, len(source) - len(todo))
        run = _ImageRun(loaded, source, store, store.source_number(spec), report, batch_size, num_workers)
        unmerged: list[Path] = []  # this run's parts since the last merge
        bar = tqdm(total=len(todo), unit="img", desc="embed images", disable=not progress)
        for start in range(0, len(todo), chunk_size):
            part = run.embed_chunk(todo[start : start + chunk_size])
            unmerged += [part] if part is not None else []
            if len(unmerged) * chunk_size >= MERGED_PART_ROWS:
                store.merge_parts("images", unmerged)
                unmerged = []
            bar.update(min(chunk_size, len(todo) - start))
        if unmerged:
            store.merge_parts("images", unmerged)
        bar.close()
    for failure in report.failed[:20]:
        logger.warning("could not embed %s", failure["reason"])
    return report


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"flush every {chunk_size!r} items: it must be a positive whole number")


def embed_text_file(
    loaded: LoadedModel,
    checkpoint: str | os.PathLike,
    texts: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float16",
    batch_size: int = 256,
    chunk_size: int = 8192,
    progress: bool = True,
) -> EmbedReport:
    """Embed the captions of a text file (one per line) into ``out/texts``; a caption is its own id."""
    _check_chunk_size(chunk_size)
    check_dtype(dtype)
    captions = list(dict.fromkeys(read_texts(texts)))  # an identical caption has an identical embedding
    with writer_lock(out):
        store = EmbeddingStore.open_for_model(out, model_info(loaded, checkpoint), dtype)
        store.remove_uncommitted("texts")
        done = set(store.table("texts").ids)
        todo = [caption for caption in captions if caption not in done]
        report = EmbedReport(store.root, "texts", 0, len(captions) - len(todo))
        bar = tqdm(total=len(todo), unit="text", desc="embed texts", disable=not progress)
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            features = encode_texts(loaded.model, loaded.processor, chunk, batch_size=batch_size)
            store.write_part("texts", features.cpu().numpy(), [{"id": caption} for caption in chunk])
            report.embedded += len(chunk)
            bar.update(len(chunk))
        bar.close()
    return report
