"""``clipforge explain``: heat maps of where each text matches each image, drawn into one figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.commands.common import (
    CHECKPOINT_HELP,
    DEVICE_HELP,
    add_input,
    add_output,
    add_weights_option,
    load_model,
    user_errors,
)
from clipforge.config.choices import EXPLAIN_METHODS
from clipforge.io import check_output


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("explain", help="heat maps of where texts match images")
    add_input(parser, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(parser)
    add_input(parser, "--image", required=True, nargs="+", help="one or more image files")
    parser.add_argument("--text", required=True, action="append", help="a text; repeat for several")
    add_output(
        parser, "--out", kind="picture", default="explain.png", help="the figure: one row per image, one map per text"
    )
    parser.add_argument("--method", default="auto", choices=list(EXPLAIN_METHODS), help="auto: by tower")
    add_output(
        parser,
        "--overlays",
        kind="folder",
        default=None,
        metavar="DIR",
        help="also save each overlay alone here (<image stem>__<text number>.png)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Draw every (image, text) heat map into ``--out``; with ``--overlays``, also save each overlay alone as
    ``<overlays>/<image stem>__<text number>.png``."""
    overlays = _overlay_paths(args.overlays, args.image, len(args.text)) if args.overlays else []
    for path in overlays:  # every file is checked before any work, and before the first is written
        check_output(path, what="--overlays")
    from clipforge.explain.heatmap import explain
    from clipforge.viz import overlay_heatmap, plot_explanations, save_image

    loaded = load_model(args.checkpoint, args.device, args.weights)
    with user_errors("explain"):
        rows = explain(loaded, args.image, args.text, args.method)
    plot_explanations(rows, args.out, names=[Path(image).name for image in args.image])
    print(f"heat maps ({rows[0][0].method}): {args.out}")
    if overlays:
        pairs = [explanation for explanations in rows for explanation in explanations]
        for path, explanation in zip(overlays, pairs, strict=True):
            save_image(overlay_heatmap(explanation.image, explanation.heatmap), path)
        print(f"overlays: {args.overlays}")


def _overlay_paths(folder: str, images: list[str], texts: int) -> list[Path]:
    """``<folder>/<image stem>__<text number>.png`` for every (image, text) pair, row by row; two images with
    the same stem are told apart by their position (``<stem>-<i>__<t>.png``)."""
    stems = [Path(image).stem for image in images]
    names = [stem if stems.count(stem) == 1 else f"{stem}-{i}" for i, stem in enumerate(stems)]
    return [Path(folder) / f"{name}__{number}.png" for name in names for number in range(texts)]
