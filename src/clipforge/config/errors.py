"""The exceptions the command line turns into one line: a user's mistake in the config or the model files (each
message says what and the fix), and a stop asked for by a signal.

They live here, below everything that imports torch, so the command line can name them without loading it.
"""


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message says which and what fits."""


class CheckpointError(ValueError):
    """A file that is not a usable clipforge checkpoint; the message says what is wrong and the fix."""


class Interrupted(Exception):
    """A command stopped by SIGINT (Ctrl-C) or SIGTERM after saving what it must; ``exit_code`` is the shell's
    convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ImageLoadError(Exception):
    """An image that cannot be used; the message names the file (or key) and why."""


class ImageTooLargeError(ImageLoadError):
    """An image whose decoded size exceeds :data:`clipforge.data.base.MAX_IMAGE_PIXELS`: skipped in training and embedding,
    refused with HTTP 413 by the web page."""


class DataError(ValueError):
    """Input data that cannot be used as it is (a malformed manifest, no readable image at all, ...): the message
    names the file, what is wrong and the fix; the command line prints it as one line and exits 2."""
