"""``clipforge <command>``: train, evaluate, search with and explain CLIP-style image-text models.

Run ``clipforge <command> --help`` for a command's options; the README has a walk-through.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clipforge.commands import MODULES
from clipforge.commands.common import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    """The ``clipforge`` parser: one sub-command per module of :mod:`clipforge.commands`."""
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake prints one line and returns 2, success returns 0."""
    args = build_parser().parse_args(argv)
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
