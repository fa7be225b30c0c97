"""Running any command as a user would, and checking the command-line contract on what comes back.

The contract (README, "bad input"): a command ends with exit code 0 or 2 (130/143 when signalled), a refusal is
one line on stderr starting ``clipforge <command>: error:``, nothing escapes as a traceback, nothing hangs, and
no input file changes. :func:`run` runs ``clipforge.cli.main`` in this process (fast: no start-up per case)
under a deadline; :func:`snapshot` fingerprints files so a test can assert that they are byte-identical after.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import signal
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipforge.cli import build_parser, main
from clipforge.commands.common import PathArgument, declared_paths
from clipforge.folders import LOCK_NAME

DEADLINE_S = 120  # a tiny model's command takes seconds; past this it hangs


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    escaped: str = ""  # the traceback of an exception that escaped main(), "" when none did

    def describe(self, argv: Sequence[str]) -> str:
        return f"argv={list(argv)}\nexit={self.code}\nstderr={self.err[-1500:]}\nescaped={self.escaped[-3000:]}"


class Hang(Exception):
    """The command ran past :data:`DEADLINE_S`."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread once ``seconds`` have passed (SIGALRM): a hang fails, not waits."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(argv: Sequence[str], deadline_s: int = DEADLINE_S) -> Outcome:
    """``clipforge argv`` in this process: (exit code, stdout, stderr, escaped traceback)."""
    out, err = io.StringIO(), io.StringIO()
    escaped = ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), deadline(deadline_s):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's own usage errors: exit code 2 and a usage line
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Hang:
            raise
        except BaseException:  # noqa: BLE001 - exactly what the contract forbids: record it
            code, escaped = -1, traceback.format_exc()
    return Outcome(code, out.getvalue(), err.getvalue(), escaped)


def assert_contract(outcome: Outcome, argv: Sequence[str], allowed: Sequence[int] = (0, 2)) -> None:
    """Exit code in ``allowed``, no traceback anywhere, and a refusal said in one line naming the command."""
    context = outcome.describe(argv)
    assert not outcome.escaped, context
    assert outcome.code in allowed, context
    assert "Traceback (most recent call last)" not in outcome.err, context
    if outcome.code == 2:
        errors = [line for line in outcome.err.splitlines() if ": error:" in line]
        assert errors, context
        assert len(errors) == 1, context


def unchanged(before: dict[str, str], *paths: Path) -> bool:
    """Whether every file of ``before`` (a :func:`snapshot`) is still there with the same bytes; files added
    beside them do not count (a command may write next to its inputs, never over them)."""
    after = snapshot(*paths)
    return {path: after.get(path) for path in before} == before


def snapshot(*paths: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``paths`` (files or folders), by path; symlinks by their target. A
    folder's writer lock file (``.clipforge.lock``: who wrote the folder last) is clipforge's own, not an input."""
    digests: dict[str, str] = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for file in files:
            if not file.is_file() or file.name == LOCK_NAME:
                continue
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser by its full name (``train``, ``data pack``, ``export onnx`` ...)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    full = f"{prefix} {name}".strip()
                    if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                        walk(child, full)
                    else:
                        found[full] = child

    walk(build_parser(), "")
    return found


def declared(parser: argparse.ArgumentParser) -> list[PathArgument]:
    """The path arguments a command's parser declared (``clipforge.commands.common.add_input/add_output``)."""
    return declared_paths(argparse.Namespace(path_arguments=parser.get_default("path_arguments")))


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path
