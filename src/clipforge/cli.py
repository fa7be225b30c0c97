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
from clipforge.commands.common import USER_ERRORS, check_declared_outputs, command_inputs
from clipforge.config.errors import Interrupted
from clipforge.cores import quiet_openmp_waits
from clipforge.io import DISK_ERRNOS, disk_error, output_policy, shorten
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
    """Run one command; a user's mistake prints one line and returns 2, success returns 0.

    Every command runs under one output policy (``clipforge.commands.common``): its declared inputs are never
    written, its declared outputs are checked before any work starts, and an existing file is only replaced with
    ``--overwrite``. A disk that cannot take a write (full, read-only, no permission) is one line too, whatever
    wrote; Ctrl-C is one line and exit code 130 (the command saves what it must first, e.g. ``train``).
    """
    args = build_parser().parse_args(argv)
    # before torch loads (OpenMP reads it then): waiting threads give their cores back soon on a shared machine
    quiet_openmp_waits()
    # heavy libraries load only once the arguments parsed: --help, --version and argument errors stay instant
    from clipforge.runtime import keep_freed_memory_in_the_heap

    keep_freed_memory_in_the_heap()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        with output_policy(overwrite=getattr(args, "overwrite", False), inputs=command_inputs(args)):
            check_declared_outputs(args)
            args.run(args)
    except USER_ERRORS as error:
        # input mistakes get their message, not a stack trace
        return _fail(args.command, str(error))
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        return _fail(args.command, str(disk_error(error.filename or "a file", error)))
    except Interrupted as stop:  # a command that saved its work on SIGINT/SIGTERM (train)
        print(f"clipforge {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"clipforge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


# a refusal is one line: a message that quotes a long value is cut here, whatever raised it
MAX_MESSAGE_CHARS = 2000


def _fail(command: str, message: str) -> int:
    print(f"clipforge {command}: error: {shorten(' '.join(message.split()), MAX_MESSAGE_CHARS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
