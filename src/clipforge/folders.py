"""Folders one command writes: one writer at a time (:func:`folder_lock`), and work that goes in whole or not at all
(:func:`scratch_folder`, :func:`staged_folder`).

The lock is ``flock`` on ``<folder>/.clipforge.lock``, which also records who holds it; it is held by ``train`` (its
run folder), ``embed`` and ``index build`` (the embedding folder), ``data pack``, the exports and ``demo``. A second
writer stops at once with :class:`~clipforge.io.FolderBusyError` naming the holder's pid and command.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: folders are then not protected against a second writer
    fcntl = None  # type: ignore[assignment]

from clipforge.io import (
    SCRATCH_PREFIX,
    FolderBusyError,
    OutputExistsError,
    as_disk_error,
    check_output,
    resolved_path,
    shorten,
    sweep_stale_temporaries,
)

LOCK_NAME = ".clipforge.lock"


@contextlib.contextmanager
def scratch_folder(parent: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder inside ``parent`` for work to check before it is moved into place; removed afterwards.

    Named ``.clipforge-scratch.<pid>.<random>``, so one left by a killed process is recognised and removed by
    the next :func:`sweep_stale_temporaries` of ``parent``.
    """
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(parent)
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=f"{SCRATCH_PREFIX}.{os.getpid()}."))
    except OSError as error:
        raise as_disk_error(parent, error) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """A scratch folder for work that goes into ``folder`` whole or not at all; yields the scratch folder.

    ``folder`` is created if missing and held with :func:`folder_lock` (one writer). When the block ends well,
    every file of the scratch folder is moved into ``folder``; each target is checked by the output policy
    first (:func:`check_output`: an existing file only with ``--overwrite``, an input never), so a refusal
    moves nothing. On any error nothing is moved, and a ``folder`` this call made is removed again.
    """
    folder = Path(folder)
    made_here = not folder.exists()
    try:
        with folder_lock(folder, command), scratch_folder(folder) as scratch:
            yield scratch
            items = sorted(scratch.iterdir())
            for item in items:
                check_output(folder / item.name)
            for item in items:
                target = folder / item.name
                if item.is_dir() and target.is_dir():  # allowed above: --overwrite replaces the whole folder
                    shutil.rmtree(target)
                os.replace(item, target)
    except BaseException:
        if made_here and folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(folder, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# One writer per folder
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold ``folder``'s writer lock inside the block (``folder`` is created if missing).

    ``flock(LOCK_EX | LOCK_NB)`` on ``folder/.clipforge.lock``, which then records the holder
    (``{"pid", "command"}``). A second writer - another process, whatever its command - stops at once with
    :class:`FolderBusyError` naming the holder's pid and command. The kernel drops a lock when its holder exits,
    killed or not, so a dead process's lock is simply taken over. The file stays after the block: it says which
    command last wrote the folder (:func:`folder_owner`).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{shorten(str(folder), 200)} is a file; expected a folder")
    key = str(resolved_path(folder))
    if key in _HELD:  # this process holds it already (a command inside a command): flock would refuse us
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole block
    except OSError as error:
        raise as_disk_error(folder, error) from None
    with handle:  # closing the file releases the lock
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_owner(handle)
                raise FolderBusyError(
                    f"{shorten(str(folder), 200)} is being written by another process (pid {holder.get('pid', '?')}, "
                    f"clipforge {holder.get('command', '?')}); wait for it to finish, stop it, or use another folder"
                ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "command": command}) + "\n")
            handle.flush()
        except OSError as error:
            raise as_disk_error(folder / LOCK_NAME, error) from None
        sweep_stale_temporaries(folder)
        _HELD[key] = 1
        try:
            yield folder
        finally:
            del _HELD[key]


_HELD: dict[str, int] = {}


def _read_owner(handle: IO[str]) -> dict[str, Any]:
    try:
        handle.seek(0)
        owner = json.loads(handle.read(4096) or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def folder_owner(folder: str | os.PathLike) -> str | None:
    """The command that last held ``folder``'s writer lock (``train``, ``embed`` ...), or None."""
    try:
        with open(Path(folder) / LOCK_NAME) as handle:
            command = _read_owner(handle).get("command")
    except OSError:
        return None
    return command if isinstance(command, str) else None
