"""``clipforge explain``: heat maps of where each text matches each image, drawn into one figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.commands.common import CHECKPOINT_HELP, DEVICE_HELP, load_model, user_errors
from clipforge.explain.heatmap import METHODS, explain
from clipforge.viz import overlay_heatmap, plot_explanations


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("explain", help="heat maps of where texts match images")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--image", required=True, nargs="+", help="one or more image files")
    parser.add_argument("--text", required=True, action="append", help="a text; repeat for several")
    parser.add_argument("--out", default="explain.png", help="the figure: one row per image, one map per text")
    parser.add_argument("--method", default="auto", choices=list(METHODS), help="auto: by tower")
    parser.add_argument("--overlays", default=None, metavar="DIR", help="also save each overlay alone here")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Draw every (image, text) heat map into ``--out``; with ``--overlays``, also save each overlay alone as
    ``<overlays>/<image stem>__<text number>.png``."""
    loaded = load_model(args.checkpoint, args.device)
    with user_errors("explain"):
        rows = explain(loaded, args.image, args.text, args.method)
    plot_explanations(rows, args.out, names=[Path(image).name for image in args.image])
    print(f"heat maps ({rows[0][0].method}): {args.out}")
    if args.overlays:
        folder = Path(args.overlays)
        folder.mkdir(parents=True, exist_ok=True)
        for image, explanations in zip(args.image, rows, strict=True):
            for number, explanation in enumerate(explanations):
                overlay_heatmap(explanation.image, explanation.heatmap).save(
                    folder / f"{Path(image).stem}__{number}.png"
                )
        print(f"overlays: {folder}")
