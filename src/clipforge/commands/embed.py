"""``clipforge embed``: images and/or captions into an embedding folder, resumable; under ``torchrun`` every process
embeds its share into the one folder."""

from __future__ import annotations

import argparse

from clipforge.commands.common import (
    CHECKPOINT_HELP,
    DEVICE_HELP,
    add_input,
    add_output,
    add_weights_option,
    load_model,
    user_errors,
)
from clipforge.config import ConfigError
from clipforge.config.choices import FLUSH_EVERY, PART_ROWS


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("embed", help="embed images (and/or captions) into a folder for search; resumable")
    add_input(parser, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(parser)
    add_input(
        parser,
        "--images",
        kind="source",
        default=None,
        help="an image folder, a manifest (.csv/.tsv/.jsonl), a data config (.yaml), or shards",
    )
    add_input(parser, "--texts", default=None, help="a text file with one caption a line")
    add_output(parser, "--out", kind="folder", required=True, help="the embedding folder (created, or added to)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="how embeddings are stored")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes")
    parser.add_argument(
        "--flush-every",
        type=int,
        default=FLUSH_EVERY,
        metavar="N",
        help=f"commit the embeddings every N images (default {FLUSH_EVERY}): an interruption loses at most N",
    )
    parser.add_argument(
        "--part-rows",
        type=int,
        default=PART_ROWS,
        metavar="N",
        help=f"merge committed work into stored parts of about N rows (default {PART_ROWS}); under torchrun, the "
        "unit of work dealt to the processes in turn",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP + " (under torchrun: each process its own GPU)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    run_embed(
        args.checkpoint,
        args.out,
        args.images,
        args.texts,
        args.dtype,
        args.batch_size,
        args.workers,
        args.device,
        flush_every=args.flush_every,
        part_rows=args.part_rows,
        weights=args.weights,
    )


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
    flush_every: int = FLUSH_EVERY,
    part_rows: int = PART_ROWS,
    weights: str = "raw",
) -> None:
    """Embed ``images`` and/or ``texts`` with ``checkpoint`` into the folder ``out``; print what was added.

    ``weights``: ``raw`` or ``ema`` (the checkpoint's moving average). Another run writing ``out`` makes this one
    fail at once (exit 2), before anything is written. Under torchrun every process runs this, embeds its share, and
    process 0 prints the summary."""
    if images is None and texts is None:
        raise ConfigError("embed needs --images and/or --texts")
    if num_workers < 0:
        raise ConfigError(f"--workers {num_workers} must be >= 0 (0 = decode in this process)")
    if flush_every < 1:
        raise ConfigError(f"--flush-every {flush_every} must be a positive number of images")
    if part_rows < 1:
        raise ConfigError(f"--part-rows {part_rows} must be a positive number of rows")
    import logging

    from clipforge.runtime import resolve_device
    from clipforge.search.embed import embed_images, embed_text_file, embedding_processes

    reports = []
    with user_errors("embed"), embedding_processes(resolve_device(device, "--device")) as context:
        if not context.is_main:  # one process tells the story; the others speak up only when something is wrong
            logging.getLogger("clipforge").setLevel(logging.WARNING)
        loaded = load_model(checkpoint, str(context.device), weights)
        if images is not None:
            reports.append(
                embed_images(
                    loaded,
                    checkpoint,
                    images,
                    out,
                    dtype,
                    batch_size,
                    chunk_size=flush_every,
                    num_workers=num_workers,
                    progress=progress,
                    part_rows=part_rows,
                    context=context,
                )
            )
        if texts is not None:
            reports.append(embed_text_file(loaded, checkpoint, texts, out, dtype, progress=progress, context=context))
    if not context.is_main:
        return
    for report in reports:
        print(f"{report.kind}: embedded {report.embedded}, already in {report.store}: {report.already_done}", end="")
        print(
            f", failed: {len(report.failed)} (listed in {report.store / report.kind / 'failed.jsonl'})"
            if report.failed
            else ""
        )
