"""``clipforge serve``: the search web page over an embedding folder (the ``serve`` extra)."""

from __future__ import annotations

import argparse

from clipforge.commands.common import DEVICE_HELP, user_errors
from clipforge.explain.heatmap import METHODS
from clipforge.runtime import resolve_device
from clipforge.search.app import serve


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="a web page to search an embedding folder (the serve extra)")
    parser.add_argument("--index", required=True, help="the folder `clipforge embed` wrote")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint that embedded it")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; other than 127.0.0.1 exposes the page")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss"])
    parser.add_argument("--explain-method", default="auto", choices=list(METHODS))
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--show-paths",
        action="store_true",
        help="show images' and the checkpoint's absolute paths in the API (default: relative to the embedded folder)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    with user_errors("serve"):
        serve(
            args.index,
            args.checkpoint,
            args.host,
            args.port,
            args.backend,
            str(resolve_device(args.device)),
            args.explain_method,
            show_paths=args.show_paths,
        )
