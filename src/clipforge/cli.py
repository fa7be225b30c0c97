"""clipforge: train, evaluate, search with and explain CLIP-style image-text models.

  clipforge demo                          train on the built-in emoji set and report held-out results
  clipforge train RECIPE|CONFIG [k=v ...] train (recipes: demo, demo-lit, flickr8k, ...)
  clipforge eval --checkpoint CKPT ...    zero-shot or retrieval on local data

Run `clipforge COMMAND --help` for a command's options.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clipforge.commands import MODULES
from clipforge.commands.common import USER_ERRORS
from clipforge.runtime import keep_freed_memory_in_the_heap
from clipforge.version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``clipforge`` parser: one sub-command per module of :mod:`clipforge.commands`."""
    parser = argparse.ArgumentParser(
        prog="clipforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake prints one line and returns 2, success returns 0."""
    args = build_parser().parse_args(argv)
    keep_freed_memory_in_the_heap()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        args.run(args)
    except USER_ERRORS as error:
        # input mistakes get their message, not a stack trace
        print(f"clipforge {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
