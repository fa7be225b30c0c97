"""``clipforge search``: the top hits of a text or image query in an embedding folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from clipforge.commands.common import DEVICE_HELP, add_input, add_output, add_weights_option, load_model, user_errors
from clipforge.config import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from clipforge.search.index import Index, SearchHit


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("search", help="search an embedding folder with a text or an image")
    add_input(parser, "--index", kind="folder", required=True, help="the folder `clipforge embed` wrote")
    add_input(parser, "--checkpoint", required=True, help="the checkpoint that embedded it")
    add_weights_option(parser, help="the weights that embedded it: raw or ema (see clipforge embed --help)")
    parser.add_argument("--query", default=None, help="a text query")
    add_input(parser, "--image", default=None, help="an image file as the query (image-to-image)")
    parser.add_argument("--top", type=int, default=10, help="results to print")
    add_output(parser, "--grid", kind="picture", default=None, metavar="PNG", help="also draw the results here")
    parser.add_argument("--kind", default="images", choices=["images", "texts"], help="search the images or captions")
    parser.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss"], help="auto: FAISS if built")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if (args.query is None) == (args.image is None):
        raise ConfigError("search needs one of --query TEXT or --image PATH")
    if args.top < 1:
        raise ConfigError(f"--top {args.top} must be positive")
    if args.grid and args.kind != "images":
        raise ConfigError("--grid draws image results; this search returned texts")
    from clipforge.data.base import decode_image
    from clipforge.search.index import Index, format_hits

    loaded = load_model(args.checkpoint, args.device, args.weights)
    with user_errors("search"):
        index = Index.load(
            args.index, loaded, kind=args.kind, backend=args.backend, device=next(loaded.model.parameters()).device
        )
        hits = index.search(text=args.query, image=args.image, k=args.top)
    print(format_hits(hits))
    if args.grid:
        with user_errors("search --grid"):
            draw_grid(index, hits, args.query if args.query is not None else decode_image(args.image), args.grid)
        print(f"grid: {args.grid}")


def draw_grid(index: Index, hits: list[SearchHit], query: str | Image.Image, grid: str) -> None:
    """The results as one picture at ``grid``; its folder is created when missing."""
    from clipforge.viz import plot_search_results

    images = [index.load_image(hit.row) for hit in hits]
    names = [Path(hit.path or hit.id).name for hit in hits]
    plot_search_results(query, images, [h.score for h in hits], names, grid)
