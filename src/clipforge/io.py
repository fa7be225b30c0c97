"""Files: written whole or not at all, never over an input or an existing file unasked, one writer per folder.

Every file clipforge writes goes through :func:`atomic_write`, which keeps three promises for every command:

* **Whole or nothing.** The bytes go to a temporary file beside the target (``.<name>.<pid>.<random>.tmp``:
  the same filesystem, so the rename is atomic), are flushed and fsynced, then renamed into place. A crash or
  ``kill -9`` mid-write leaves the previous file whole; the temporary file names its writer's process, so the
  next write into that folder removes the ones whose process is gone (:func:`sweep_stale_temporaries`).
* **Nothing lost unasked.** The active :class:`OutputPolicy` (set by the command line for the command it runs,
  :func:`output_policy`) names the command's inputs and whether ``--overwrite`` was given. A target that is one
  of the inputs (the same file after resolving links) is always refused; an existing target is refused unless
  the caller owns it (``replace=True``: a run's own ``last.pt``, an embedding folder's ``meta.json``) or the
  user said ``--overwrite``. Without ``replace``, the final rename cannot clobber a file that appeared meanwhile
  (it is a hard link, which fails on an existing name).
* **One clear message.** A refused target, a folder another process writes (``clipforge.folders``) and a disk
  that cannot take the write (full, read-only, no permission) raise :class:`OutputError` subclasses whose
  message names the file and the fix; the command line prints it as one line and exits 2.

:func:`weights_fingerprint` is the one fingerprint of a model's weights (it imports torch when called, so
reading or writing files never loads it).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import reprlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: folders are then not protected against a second writer
    fcntl = None  # type: ignore[assignment]

TEMPORARY_SUFFIX = ".tmp"
# folders of work in progress (an export being checked, say): renamed into place or removed, never left
SCRATCH_PREFIX = ".clipforge-scratch"

# errors of the disk rather than of the program: each gets one line with the fix, not a traceback
_DISK_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write to another folder",
    errno.EDQUOT: "the disk quota is used up: free some space or write to another folder",
    errno.EROFS: "the filesystem is read-only: write to another folder",
    errno.EACCES: "no permission to write there: write to another folder or fix its permissions",
    errno.EPERM: "the operation is not permitted there: write to another folder or fix its permissions",
    errno.EFBIG: "the file is larger than the filesystem allows: write to another folder",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter one",
    errno.EISDIR: "it is a folder, not a file: choose a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
}
DISK_ERRNOS = frozenset(_DISK_FIXES)


class OutputError(Exception):
    """A write that the output policy refuses or the disk cannot take; the message names the file and the fix."""


class OutputExistsError(OutputError, FileExistsError):
    """The target exists and the user did not ask to overwrite it."""


class OutputIsInputError(OutputError):
    """The target is one of the command's inputs: writing it would destroy what the command reads."""


class FolderBusyError(OutputError):
    """Another live process holds the folder's writer lock."""


class DiskWriteError(OutputError):
    """The disk refused the write (full, read-only, no permission ...)."""


def disk_error(path: str | os.PathLike, error: OSError) -> DiskWriteError:
    """The one-line error for an ``OSError`` of the disk (``error.errno`` in :data:`DISK_ERRNOS`) at ``path``."""
    fix = _DISK_FIXES.get(error.errno or 0, "check the folder and the disk")
    return DiskWriteError(f"cannot write {shorten(str(path), 200)}: {error.strerror or error}; {fix}")


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for a message: a value echoed back is never megabytes long."""
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text):,} characters)"


# a value echoed in a message is cut short as it is written (reprlib): a 10 MB string or a deeply nested list
# is never formatted whole, not even to be cut afterwards
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxarray = _SHORT.maxdict = _SHORT.maxset = 6


def shown(value: Any) -> str:
    """``repr(value)`` for a message, bounded in length and depth while it is built (``reprlib``)."""
    return _SHORT.repr(value)


# ----------------------------------------------------------------------------------------------
# The output policy
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPolicy:
    """What the running command may write over.

    ``overwrite``: the user asked to replace existing targets (``flag``, e.g. ``--overwrite``). ``inputs``: the
    files and folders the command reads (absolute, links resolved); none of them is ever a target.
    """

    overwrite: bool = False
    inputs: tuple[Path, ...] = ()
    flag: str = "--overwrite"


_POLICY: contextvars.ContextVar[OutputPolicy] = contextvars.ContextVar("clipforge_output_policy")


def current_policy() -> OutputPolicy:
    """The policy of the command running in this context (outside any command: nothing is an input, and an
    existing file is only replaced by its owner)."""
    return _POLICY.get(OutputPolicy())


def resolved_path(path: str | os.PathLike) -> Path:
    # realpath, not Path.resolve: a symlink loop resolves as far as it goes instead of raising
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(path))))


@contextlib.contextmanager
def output_policy(
    overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (), flag: str = "--overwrite"
) -> Iterator[OutputPolicy]:
    """Run the block under an :class:`OutputPolicy`: ``inputs`` are protected, ``overwrite`` allows replacing."""
    policy = OutputPolicy(overwrite, tuple(dict.fromkeys(resolved_path(p) for p in inputs if str(p))), flag)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links: two names, one file
    except OSError:
        return False


def check_output(path: str | os.PathLike, replace: bool = False, what: str = "") -> Path:
    """Raise unless ``path`` may be written under the current policy; returns it as a Path.

    Refused: a target that is one of the command's inputs (always, ``--overwrite`` or not), and an existing
    target unless ``replace`` (the caller owns it) or the policy's ``overwrite``. ``what`` names the flag in the
    message (``--out``).
    """
    path = Path(path)
    policy = current_policy()
    label = f"{what} {shorten(str(path), 200)}" if what else shorten(str(path), 200)
    target = resolved_path(path)
    for protected in policy.inputs:
        if _same_file(target, protected):
            raise OutputIsInputError(
                f"{label} is one of this command's inputs ({shorten(str(protected), 200)}); writing it would "
                "destroy what the command reads: choose another output path"
            )
    if (path.exists() or path.is_symlink()) and not (replace or policy.overwrite):
        raise OutputExistsError(
            f"{label} exists already; clipforge never writes over a file unasked: choose another path, or add "
            f"{policy.flag} to replace it"
        )
    return path


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _temporary_name(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], replace: bool = False) -> Path:
    """Write ``path`` through ``write(handle)`` (a binary handle): whole or not at all, and as the policy allows.

    ``replace``: the caller owns ``path`` (a run's own checkpoint, a store's own ``meta.json``) and replaces it;
    otherwise an existing ``path`` is refused (:class:`OutputExistsError`) unless the user passed
    ``--overwrite``. A target that is one of the command's inputs is always refused (:func:`check_output`).
    The bytes go to a temporary file in the same folder, are flushed and fsynced, then renamed over ``path``. On
    any error, interruption included, the temporary file is removed and ``path`` is untouched. A full,
    read-only or forbidden disk raises :class:`DiskWriteError`.
    """
    path = check_output(path, replace)
    replace = replace or current_policy().overwrite
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(path.parent)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=_temporary_name(path), suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise as_disk_error(path, error) from None
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask), so a
        # checkpoint or embedding table is as readable to the user's group as any other file they write
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _commit(temporary, path, replace)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise as_disk_error(path, error) from None
        raise
    return path


def as_disk_error(path: Path, error: OSError) -> OSError | DiskWriteError:
    return disk_error(path, error) if error.errno in DISK_ERRNOS else error


def _commit(temporary: str, path: Path, replace: bool) -> None:
    """Rename ``temporary`` to ``path``; without ``replace`` never over a file that exists by now."""
    if replace:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # fails on an existing name: no window in which a new file is clobbered
    except FileExistsError:
        raise OutputExistsError(
            f"{shorten(str(path), 200)} appeared while clipforge was writing it; nothing was replaced: choose "
            f"another path, or add {current_policy().flag} to replace it"
        ) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(temporary, path)  # a filesystem without hard links: checked just before, renamed now
        return
    os.unlink(temporary)


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, replace: bool = False) -> Path:
    """:func:`atomic_write` of a UTF-8 string."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), replace)


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 1, replace: bool = False) -> Path:
    """:func:`atomic_write` of ``value`` as JSON (sorted keys, so equal values give equal bytes)."""
    return atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=True, default=str) + "\n", replace)


# ----------------------------------------------------------------------------------------------
# What killed processes leave behind
# ----------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _writer_pid(name: str, prefix: str) -> int | None:
    """The pid a temporary or scratch name carries (``.<name>.<pid>.<random>.tmp``, ``<prefix>.<pid>.<random>``)."""
    parts = name.removesuffix(TEMPORARY_SUFFIX).split(".") if name.endswith(TEMPORARY_SUFFIX) else None
    if parts is None and name.startswith(prefix + "."):
        parts = name[len(prefix) :].split(".")
    if not parts or len(parts) < 3 or not parts[-2].isdigit():
        return None
    return int(parts[-2])


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and scratch folders in ``folder`` whose writing process is gone; return them.

    Only names this module makes are touched (``.<name>.<pid>.<random>.tmp`` files, ``.clipforge-scratch.<pid>.*``
    folders), and only when no process with that pid lives: a live writer's work in progress stays. Each folder
    is swept once per process.
    """
    folder = Path(folder)
    key = str(resolved_path(folder))
    if key in _SWEPT:
        return []
    _SWEPT.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        pid = _writer_pid(entry.name, SCRATCH_PREFIX)
        if pid is None or _alive(pid):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # another sweeper, or a folder we may not write: leave it
        removed.append(path)
    return removed


_SWEPT: set[str] = set()


def weights_fingerprint(module: Any) -> str:
    """SHA-256 over every tensor of ``module.state_dict()`` (name, dtype, shape and bytes), in order.

    Two modules have the same fingerprint exactly when their state dicts are equal bit for bit: it keys the
    feature cache and stamps embedding folders, so features of different weights are never mixed.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
