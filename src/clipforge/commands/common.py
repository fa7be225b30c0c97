"""What every command shares: turning bad input into one message, and loading a checkpoint for use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from clipforge.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from clipforge.config import ConfigError
from clipforge.data.base import DataError, ImageLoadError
from clipforge.packaged import MissingPackageError
from clipforge.runtime import resolve_device

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
CHECKPOINT_HELP = "a run's last.pt, best.pt or step_<N>.pt (or a checkpoint written by clipforge import)"

# what a user's mistake raises anywhere below the command line; each is printed as one line, exit code 2
# (MissingPackageError: weights named package:<name> whose pip package is not installed; it names the install)
USER_ERRORS = (ConfigError, CheckpointError, DataError, FileNotFoundError, FileExistsError, MissingPackageError)


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn ``ValueError`` / ``ImportError`` / ``ImageLoadError`` raised by bad input into ``ConfigError``."""
    try:
        yield
    except (ValueError, ImportError, ImageLoadError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{what}: {error}") from error


def load_model(checkpoint: str | os.PathLike, device: str = "auto") -> LoadedCheckpoint:
    """The checkpoint's model (eval mode) on ``device`` (``auto``: CUDA when there is one)."""
    return load_checkpoint(checkpoint, resolve_device(device))
