"""The ``embed``, ``search``, ``index build`` and ``serve`` commands: load, call the library, print.

Input mistakes (a folder of another model, an empty query, a missing optional package) come back as
``ConfigError`` with the message, which the command line prints without a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from clipforge.config import ConfigError
from clipforge.train.checkpoint import LoadedCheckpoint, load_checkpoint


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn ``ValueError`` / ``ImportError`` / ``ImageLoadError`` raised by bad input into ``ConfigError``."""
    from clipforge.data.sources import ImageLoadError

    try:
        yield
    except (ValueError, ImportError, ImageLoadError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{what}: {error}") from error


def load_model(checkpoint: str | os.PathLike, device: str = "auto") -> LoadedCheckpoint:
    from clipforge.train.loop import resolve_device

    return load_checkpoint(checkpoint, resolve_device(device))


def run_embed(
    checkpoint: str,
    out: str,
    images: str | None = None,
    texts: str | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> None:
    from clipforge.search.embed import embed_images, embed_text_file

    if images is None and texts is None:
        raise ConfigError("embed needs --images and/or --texts")
    loaded = load_model(checkpoint, device)
    reports = []
    with user_errors("embed"):
        if images is not None:
            reports.append(
                embed_images(
                    loaded, checkpoint, images, out, dtype, batch_size, num_workers=num_workers, progress=progress
                )
            )
        if texts is not None:
            reports.append(embed_text_file(loaded, checkpoint, texts, out, dtype, progress=progress))
    for report in reports:
        print(f"{report.kind}: embedded {report.embedded}, already in {report.store}: {report.already_done}", end="")
        print(
            f", failed: {len(report.failed)} (listed in {report.store / report.kind / 'failed.jsonl'})"
            if report.failed
            else ""
        )


def run_search(
    index_dir: str,
    checkpoint: str | None,
    query: str | None = None,
    image: str | None = None,
    top: int = 10,
    grid: str | None = None,
    kind: str = "images",
    backend: str = "auto",
    device: str = "auto",
) -> None:
    from clipforge.search.index import Index, format_hits

    if (query is None) == (image is None):
        raise ConfigError("search needs one of --query TEXT or --image PATH")
    if checkpoint is None:
        raise ConfigError("search needs --checkpoint: queries are embedded with the model that embedded the index")
    if top < 1:
        raise ConfigError(f"--top {top} must be positive")
    loaded = load_model(checkpoint, device)
    with user_errors("search"):
        index = Index.load(index_dir, loaded, kind=kind, backend=backend, device=next(loaded.model.parameters()).device)
        hits = index.search(text=query, image=image, k=top)
    print(format_hits(hits))
    if grid:
        from clipforge.data.sources import decode_image
        from clipforge.viz import plot_search_results

        if kind != "images":
            raise ConfigError("--grid draws image results; this search returned texts")
        images = [index.load_image(hit.row) for hit in hits]
        names = [Path(hit.path or hit.id).name for hit in hits]
        plot_search_results(
            query if query is not None else decode_image(image), images, [h.score for h in hits], names, grid
        )
        print(f"grid: {grid}")


def run_index_build(
    index_dir: str,
    kind: str = "images",
    ann: str = "ivf",
    nlist: int | None = None,
    hnsw_m: int = 32,
    target_recall: float = 0.95,
) -> None:
    from clipforge.search.ann import build_faiss_index
    from clipforge.search.store import EmbeddingStore

    with user_errors("index build"):
        report = build_faiss_index(EmbeddingStore(index_dir), kind, ann, nlist, hnsw_m, target_recall)
    print(
        f"built {report.factory} in {report.seconds:.1f} s: {report.path}; {report.knob}={report.value} "
        f"gives recall@10 {report.recall_at_10:.3f} against exact search"
    )


def run_serve(
    index_dir: str,
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    device: str = "auto",
    explain_method: str = "auto",
) -> None:
    from clipforge.search.app import serve
    from clipforge.train.loop import resolve_device

    with user_errors("serve"):
        serve(index_dir, checkpoint, host, port, backend, str(resolve_device(device)), explain_method)
