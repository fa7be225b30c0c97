"""Loading from Hugging Face folders and hub ids, quietly and with errors that teach: what every tokenizer, text
tower and import that reads a ``save_pretrained`` folder goes through."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from clipforge.config import ConfigError
from clipforge.packaged import hf_load_kwargs, resolve_location

Loaded = TypeVar("Loaded")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside, transformers shows no progress bars and no info logs; its warnings still show.

    Every command loads its towers and tokenizer, and a "Loading weights" bar each time buries what the
    command itself says. Verbosity and bars are put back as they were.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(max(verbosity, hf_logging.WARNING))  # higher = quieter; never louder than asked
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def looks_like_path(location: str) -> bool:
    """A string that can only be a file-system path: a hub id is ``name`` or ``namespace/name``."""
    return location.startswith(("/", ".", "~", "\\")) or location.count("/") > 1 or "\\" in location


def hf_from_pretrained(
    load: Callable[..., Loaded], spec: str, field: str, needs: Sequence[str] = ("config.json",)
) -> Loaded:
    """``load(location, **kwargs)`` (a ``from_pretrained``) for a hub id, local folder or ``package:<name>``,
    quietly (:func:`quiet_transformers`); a local folder never consults the hub.

    A name that is neither a folder holding one of ``needs`` nor a hub id transformers can find (downloaded,
    or cached when offline) raises ConfigError naming ``field`` (e.g. ``model.text.name``), instead of
    transformers' "Repo id must be in the form..." or ``OSError`` traceback.
    """
    location = resolve_location(spec)
    folder = Path(location).expanduser()
    if folder.is_dir():
        if not any((folder / name).is_file() for name in needs):
            raise ConfigError(
                f"{field}={spec!r} is a folder without {' or '.join(needs)}: point it at a folder written by "
                "save_pretrained, or at a Hugging Face hub id"
            )
        location = str(folder)
    elif looks_like_path(location):
        raise ConfigError(f"{field}={spec!r}: no such folder (a path to a folder written by save_pretrained)")
    try:
        with quiet_transformers():
            return load(location, **hf_load_kwargs(location))
    except (OSError, ValueError) as error:
        if folder.is_dir():  # a folder with a config but not the rest (weights, vocabulary), or a broken config
            raise ConfigError(f"{field}={spec!r}: {str(error).strip().splitlines()[0]}") from error
        if not isinstance(error, OSError):
            raise
        raise ConfigError(
            f"{field}={spec!r} is neither a local folder with {needs[0]} nor a Hugging Face hub id that is "
            "cached here or can be downloaded (offline, with HF_HUB_OFFLINE=1, only cached ids load)"
        ) from error
