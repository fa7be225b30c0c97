"""An embedding folder's ``meta.json`` (its format stamp, the model that embedded it, the dtype, the sources, the
FAISS indexes) and the folder's writer lock: read and checked, changed only under the lock on a fresh read."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.data.base import DataError
from clipforge.folders import folder_lock
from clipforge.io import FolderBusyError, atomic_write
from clipforge.version import __version__

FORMAT = "clipforge-embeddings"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
# a meta.json update holds the lock for milliseconds: wait this long for another one before giving up (an
# embed run or an index build holds it for minutes, and waiting for those would only look like a hang)
META_WAIT_S = 5.0
# meta.json holds a stamp, the model, a few sources and index entries: kilobytes; anything larger is not ours
MAX_META_BYTES = 16 * 2**20


class StoreError(DataError):
    """An embedding folder that cannot be read as it is (``meta.json``, a part or a table damaged or foreign).

    A :class:`~clipforge.data.base.DataError`: the command line prints its message as one line (exit 2) and the
    web page answers 404 for an image it stops, not 500."""


@contextlib.contextmanager
def writer_lock(root: str | os.PathLike, command: str = "embed") -> Iterator[Path]:
    """Hold the embedding folder ``root``'s writer lock (created if missing) inside the block: the one folder lock
    of every command (:func:`clipforge.io.folder_lock`), taken by ``command``.

    A second writer (another ``clipforge embed``, an ``index build``) fails at once with
    :class:`~clipforge.io.FolderBusyError` naming the holder, instead of waiting or appending the same ids again.
    The kernel drops the lock when its holder exits, killed or not. Within the process holding it the lock nests,
    so the holder's :meth:`EmbeddingStore.update_meta` takes it again without waiting.
    """
    root = Path(root)
    if root.is_file():
        raise FileExistsError(f"--out {str(root)!r} is a file; expected a folder for the embeddings")
    with folder_lock(root, command):
        yield root


@contextlib.contextmanager
def meta_lock(root: Path) -> Iterator[None]:
    """:func:`writer_lock` of ``root`` (nested when this process holds it already), waiting up to
    ``META_WAIT_S`` for another process's short hold."""
    deadline = time.monotonic() + META_WAIT_S
    while True:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(writer_lock(root, "update meta.json"))
        except FolderBusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
            continue
        with stack:
            yield
        return


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    """``root/meta.json``, checked: FileNotFoundError when ``root`` is no embedding folder, StoreError when the
    file cannot be read, is not JSON, or lacks a field the readers use (format stamp, model, dtype, sources)."""
    root = Path(root)
    path = root / "meta.json"
    if root.is_file():
        raise StoreError(f"{root} is a file, not an embedding folder (the folder `clipforge embed --out` wrote)")
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not an embedding folder (no meta.json); create one with "
            "`clipforge embed --checkpoint CKPT --images DIR --out EMB_DIR`"
        )
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise StoreError(f"{path} is over {MAX_META_BYTES >> 20} MiB: not the meta.json clipforge writes")
        meta = json.loads(path.read_bytes())
    except OSError as error:
        raise StoreError(f"{path} cannot be read: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StoreError(
            f"{path} is not valid JSON ({error}); the folder's record of its model and sources is damaged: "
            "restore the file, or embed again into a new folder"
        ) from None
    check_meta(meta, path)
    return meta


def check_meta(meta: Any, path: Path) -> None:
    """StoreError unless ``meta`` has every field the readers take from it, of the right type."""

    def bad(what: str) -> StoreError:
        return StoreError(f"{path}: {what}; it is not a meta.json `clipforge embed` wrote (or it was edited)")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"no '{FORMAT}' format stamp")
    version = meta.get("format_version", 0)
    if not is_int(version):
        raise bad(f"format_version {version!r} is not a whole number")
    if version > FORMAT_VERSION:
        raise StoreError(f"{path.parent} was written by a newer clipforge (format {version}); upgrade clipforge")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise bad("'model' is not an object with the weights' 'fingerprint'")
    if not isinstance(model.get("checkpoint", ""), str) or not (model.get("step") is None or is_int(model["step"])):
        raise bad("'model' has a 'checkpoint' that is not a path or a 'step' that is not a whole number")
    if "embed_dim" in model and not (is_int(model["embed_dim"]) and model["embed_dim"] > 0):
        raise bad(f"'model.embed_dim' {model['embed_dim']!r} is not a positive whole number")
    if meta.get("dtype") not in DTYPES:
        raise bad(f"'dtype' {meta.get('dtype')!r} is not one of {list(DTYPES)}")
    sources = meta.get("sources")
    if not isinstance(sources, list) or not all(isinstance(source, str) for source in sources):
        raise bad("'sources' is not a list of strings")


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    text = json.dumps(meta, indent=2).encode()
    atomic_write(root / "meta.json", lambda handle: handle.write(text), replace=True)


def is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def new_meta(model_info: dict[str, Any], dtype: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clipforge_version": __version__,
        "model": model_info,
        "dtype": dtype,
        "sources": [],
    }


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(DTYPES)}")
    return dtype
