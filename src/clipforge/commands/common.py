"""What every command shares: its inputs and outputs declared once, bad input as one message, loading a model.

**Paths.** A command declares each path argument with :func:`add_input` or :func:`add_output` instead of a
plain ``add_argument``. :func:`clipforge.cli.main` then runs every command under one output policy
(:func:`clipforge.io.output_policy`): the declared inputs (and the files a ``--data`` spec reads) are never
written, a declared output that exists is refused before any work starts unless ``--overwrite`` is given (every
command with outputs has that flag, :func:`add_overwrite`), and every write below goes through
:func:`clipforge.io.atomic_write`, which applies the same policy when the file is committed. A new command that
declares its paths inherits all of it, and the contract tests find its outputs by the same declarations.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from clipforge.config import CheckpointError, ConfigError, DataError, ImageLoadError
from clipforge.config.choices import WEIGHTS_CHOICES
from clipforge.io import OutputError, OutputExistsError, check_output, shorten
from clipforge.packaged import MissingPackageError

if TYPE_CHECKING:
    from clipforge.model.factory import LoadedModel

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
CHECKPOINT_HELP = (
    "the model: a run's last.pt, best.pt or step_<N>.pt, a checkpoint written by clipforge import, or weights to "
    "import on the fly (hf:FOLDER, open_clip:CONFIG.json:WEIGHTS)"
)
WEIGHTS_HELP = (
    "which weights of the checkpoint: raw (as trained) or ema (the moving average a run keeps with train.ema); "
    "LoRA adapters are folded into the weights either way"
)
OVERWRITE_HELP = "replace output files that exist already (an input of the command is never replaced)"

# what a user's mistake raises anywhere below the command line; each is printed as one line, exit code 2
# (MissingPackageError: weights named package:<name> whose pip package is not installed; it names the install;
# OutputError: a target the output policy refuses, a folder another process writes, a full or read-only disk)
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointError,
    DataError,
    FileNotFoundError,
    FileExistsError,
    MissingPackageError,
    OutputError,
)

# what matplotlib and Pillow can write, by suffix: a picture output must be one of these
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp")

InputKind = Literal["file", "folder", "path", "data", "source"]
OutputKind = Literal["file", "picture", "folder"]


@dataclass(frozen=True)
class PathArgument:
    """One declared path argument: its ``dest`` in the namespace, its flag, its role and what it names.

    Inputs: ``file``/``folder``/``path`` (a file or folder), ``data`` (``--data``'s YAML file and/or key=value
    fields, whose paths are read too), ``source`` (``embed --images``: a folder, manifest, data YAML or shards).
    Outputs: ``file``, ``picture`` (a file whose suffix says an image format) or ``folder`` (added to or filled;
    its own rules say when an existing one is fine).
    """

    dest: str
    flag: str
    role: Literal["input", "output"]
    kind: str


def _declare(parser: argparse.ArgumentParser, argument: PathArgument) -> None:
    declared = list(parser.get_default("path_arguments") or [])
    parser.set_defaults(path_arguments=[*declared, argument])


def add_input(parser: argparse.ArgumentParser, *flags: str, kind: InputKind = "file", **kwargs) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)`` for a path the command reads (never written over)."""
    action = parser.add_argument(*flags, **kwargs)
    _declare(parser, PathArgument(action.dest, flags[0], "input", kind))
    return action


def add_output(parser: argparse.ArgumentParser, *flags: str, kind: OutputKind = "file", **kwargs) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)`` for a path the command writes; adds ``--overwrite`` once."""
    action = parser.add_argument(*flags, **kwargs)
    _declare(parser, PathArgument(action.dest, flags[0], "output", kind))
    add_overwrite(parser)
    return action


def add_overwrite(parser: argparse.ArgumentParser, help: str = OVERWRITE_HELP) -> None:
    """The one ``--overwrite`` flag of a command (added once, whatever calls it)."""
    if not any("--overwrite" in action.option_strings for action in parser._actions):
        parser.add_argument("--overwrite", action="store_true", help=help)


def declared_paths(args: argparse.Namespace) -> list[PathArgument]:
    """The path arguments the command of ``args`` declared."""
    return list(getattr(args, "path_arguments", None) or [])


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value if item not in (None, "")]
    return [str(value)]


def command_inputs(args: argparse.Namespace) -> list[str]:
    """Every file and folder the command of ``args`` reads, as far as its arguments say (for the output policy).

    A ``data`` spec contributes its YAML file and the paths its fields name; a spec that does not parse
    contributes what it can (the command itself reports the mistake).
    """
    inputs: list[str] = []
    for argument in declared_paths(args):
        if argument.role != "input":
            continue
        values = _values(getattr(args, argument.dest, None))
        if argument.kind in ("data", "source"):
            inputs.extend(_data_spec_paths(values))
        else:
            inputs.extend(values)
    return inputs


def _data_spec_paths(items: Sequence[str]) -> list[str]:
    """The files a ``--data``/source spec reads: a YAML file first, and the paths of the fields it sets."""
    from clipforge.commands.data_spec import parse_data_spec

    paths = [item for item in items if "=" not in item]
    with contextlib.suppress(ConfigError, DataError, OSError, ValueError):
        paths.extend(parse_data_spec(items).input_paths())
    return paths


def check_declared_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work starts, a declared output that is an input, or exists without ``--overwrite``.

    File and picture outputs must not exist (unless ``--overwrite``); a picture's suffix must name a format
    matplotlib can write. Folder outputs are only checked against the inputs: each command says when an existing
    folder is fine (``embed`` adds to one, an export needs it new or empty).
    """
    for argument in declared_paths(args):
        if argument.role != "output":
            continue
        for value in _values(getattr(args, argument.dest, None)):
            check_output(value, replace=argument.kind == "folder", what=argument.flag)
            if argument.kind == "folder" and Path(value).exists() and not Path(value).is_dir():
                raise OutputExistsError(f"{argument.flag} {shorten(value, 200)} is a file; expected a folder")
            if argument.kind == "picture":
                check_picture_path(value, argument.flag)


def check_picture_path(path: str | os.PathLike, flag: str) -> Path:
    """``path`` when its suffix names a picture format (``.png`` ...); ConfigError naming ``flag`` otherwise."""
    path = Path(path)
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise ConfigError(
            f"{flag} {str(path)[:200]!r}: a picture needs one of the suffixes {list(PICTURE_SUFFIXES)}, e.g. "
            f"{path.with_suffix('.png').name}"
        )
    return path


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn ``ValueError`` / ``ImportError`` / ``ImageLoadError`` raised by bad input into ``ConfigError``."""
    try:
        yield
    except (ValueError, ImportError, ImageLoadError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{what}: {error}") from error


def add_weights_option(parser: argparse.ArgumentParser, flag: str = "--weights", help: str = WEIGHTS_HELP) -> None:
    """The ``--weights raw|ema`` choice of a command that loads a model (:func:`load_model`'s ``weights``)."""
    parser.add_argument(flag, choices=WEIGHTS_CHOICES, default="raw", help=help)


def load_model(checkpoint: str | os.PathLike, device: str = "auto", weights: str = "raw") -> LoadedModel:
    """The model ``checkpoint`` names (any weights spec: a checkpoint, ``hf:``, ``open_clip:``), in eval mode on
    ``device`` (``auto``: CUDA when there is one), with its processor; ``weights``: ``raw`` or ``ema`` (the
    checkpoint's moving average). LoRA adapters come folded into the weights (``clipforge.interop.load``)."""
    from clipforge.interop.load import from_pretrained
    from clipforge.runtime import resolve_device

    return from_pretrained(checkpoint, resolve_device(device, "--device"), weights)
