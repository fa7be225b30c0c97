"""Files that survive a crash, and the one fingerprint of a model's weights.

Everything clipforge writes that a later run reads back (checkpoints, embedding tables, cache progress,
results) goes through :func:`atomic_write`: a crash or ``kill -9`` mid-write leaves the previous file whole,
never a half-written one under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(handle)`` (a binary handle) without ever exposing a partial file.

    The bytes go to a temporary file in the same folder (``.<name>.<random>.tmp``: the same filesystem, so the
    rename is atomic), are flushed and fsynced to disk, then the file is renamed over ``path``. On any error,
    interruption included, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask), so a
        # checkpoint or embedding table is as readable to the user's group as any other file they write
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 string."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``value`` as JSON (sorted keys, so equal values give equal bytes)."""
    return atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=True, default=str) + "\n")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of ``module.state_dict()`` (name, dtype, shape and bytes), in order.

    Two modules have the same fingerprint exactly when their state dicts are equal bit for bit: it keys the
    feature cache and stamps embedding folders, so features of different weights are never mixed.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
