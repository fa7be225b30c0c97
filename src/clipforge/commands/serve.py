"""``clipforge serve``: the search web page over an embedding folder (the ``serve`` extra)."""

from __future__ import annotations

import argparse

from clipforge.commands.common import DEVICE_HELP, add_input, add_weights_option, user_errors
from clipforge.config import ConfigError
from clipforge.config.choices import EXPLAIN_METHODS


def port_number(text: str) -> int:
    """A TCP port from 0 (any free one) to 65535, else ``ConfigError``. Checked in ``run``, not by argparse,
    whose errors print the whole usage before the message: a user error is one line here."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 5) or int(digits) > 65535:
        raise ConfigError(f"--port {_shown(text)} is not a port: use a whole number from 1 to 65535, e.g. 8000")
    return int(digits)


def _shown(text: str, limit: int = 20) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="a web page to search an embedding folder (the serve extra)")
    add_input(parser, "--index", kind="folder", required=True, help="the folder `clipforge embed` wrote")
    add_input(parser, "--checkpoint", required=True, help="the checkpoint that embedded it")
    add_weights_option(parser, help="the weights that embedded it: raw or ema (see clipforge embed --help)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; other than 127.0.0.1 exposes the page")
    parser.add_argument("--port", default="8000", help="TCP port, 1 to 65535 (0: any free port)")
    parser.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss"])
    parser.add_argument("--explain-method", default="auto", choices=list(EXPLAIN_METHODS))
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--show-paths",
        action="store_true",
        help="show images' and the checkpoint's absolute paths in the API (default: relative to the embedded folder)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    port = port_number(args.port)  # before anything loads
    from clipforge.runtime import resolve_device

    with user_errors("serve"):
        from clipforge.search.server import serve  # uvicorn: the serve extra

        serve(
            args.index,
            args.checkpoint,
            args.host,
            port,
            args.backend,
            str(resolve_device(args.device)),
            args.explain_method,
            show_paths=args.show_paths,
            weights=args.weights,
        )
