"""Start-up checks and small readers shared by the file-based sources.

Everything here runs when a source is built, before the first training step, so that a wrong path or a
file in the wrong format fails at once with a message naming the file, what was expected, and (where
it can tell) which ``data.kind`` would fit, instead of as a stream of skipped samples an hour later.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import IO, Any

from clipforge.data.base import DataError

SHIPPED_CLASSNAMES_PACKAGE = "clipforge.data.classnames"


def require_file(path: str | os.PathLike, kind: str, expected: str) -> Path:
    """``path`` as a Path when it is an existing file; else ``FileNotFoundError`` naming it and ``expected``."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"data.kind={kind!r}: {str(path)!r} is a folder; expected {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"data.kind={kind!r}: {str(path)!r} does not exist; expected {expected}")
    return path


def require_dir(path: str | os.PathLike, kind: str, expected: str) -> Path:
    """``path`` as a Path when it is an existing folder; else ``FileNotFoundError`` naming it and ``expected``."""
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(f"data.kind={kind!r}: {str(path)!r} is a file; expected {expected}")
    if not path.is_dir():
        raise FileNotFoundError(f"data.kind={kind!r}: folder {str(path)!r} does not exist; expected {expected}")
    return path


def not_utf8(path: Path, where: str) -> DataError:
    """The error for a text file that is not UTF-8, naming ``where`` (e.g. ``manifest <path>``), the line of
    the first bad byte and the fix.

    Only called once decoding has failed, so re-reading the file line by line (as bytes) costs nothing on
    the good path.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = raw[error.start]
                return DataError(
                    f"{where}, line {number}: not UTF-8 text (byte 0x{byte:02x} at column {error.start + 1}); "
                    "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 old.csv > new.csv"
                )
    return DataError(f"{where}: not UTF-8 text; save the file as UTF-8")


# The longest line a text data file (a manifest, a captions file) may hold: a row of a few captions is a few
# kilobytes; a line beyond this is not a row (a binary file, a whole file without newlines) and is refused
# before it is read into memory whole.
MAX_LINE_CHARS = 1 << 20


def bounded_lines(handle: IO[str], where: str) -> Iterator[str]:
    """The lines of ``handle`` (each with its newline), refusing with ``DataError`` a line longer than
    :data:`MAX_LINE_CHARS`; ``where`` names the file in the message. Memory stays bounded by that length."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise DataError(
                f"{where}, line {number}: longer than {MAX_LINE_CHARS:,} characters; a data row is far shorter "
                "(is this the right file, with newlines between its rows?)"
            )
        yield line


# csv's own field limit (131,072 characters by default) raised to the line bound: a caption that long is cut to
# MAX_TEXT_CHARS when it is read, instead of stopping the reader with csv.Error
csv.field_size_limit(MAX_LINE_CHARS)


# The largest text file read whole (annotation JSON, split lists): COCO's caption files are ~90 MB; a file beyond
# this is refused instead of being decoded into memory whole.
MAX_TEXT_FILE_BYTES = 1 << 30


def read_text(path: Path, where: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped) of at most :data:`MAX_TEXT_FILE_BYTES`;
    :func:`not_utf8` when it is not UTF-8, ``DataError`` when it is larger."""
    size = path.stat().st_size
    if size > MAX_TEXT_FILE_BYTES:
        raise DataError(f"{where}: {size:,} bytes; clipforge reads text files of at most {MAX_TEXT_FILE_BYTES:,} whole")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path, where) from None


def read_json(path: Path, kind: str, expected: str) -> Any:
    """The parsed JSON of ``path``; a file that is not JSON raises ``DataError`` saying what was expected."""
    text = read_text(path, f"data.kind={kind!r}: {path}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"data.kind={kind!r}: {path} is not valid JSON ({error.msg} at line {error.lineno}); expected {expected}"
        ) from None


def resolve_image_root(image_root: str, candidates: Sequence[Path], kind: str) -> Path:
    """The folder that image paths are relative to.

    ``image_root`` when given (it must exist); else the first existing folder of ``candidates`` (the
    layouts the datasets are distributed in), else the last candidate.
    """
    if image_root:
        return require_dir(image_root, kind, "data.image_root: the folder holding the images")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[-1]


def check_images_present(root: Path, relative_paths: Sequence[str], origin: Path, kind: str, probes: int = 16) -> None:
    """Fail at start when *none* of ``probes`` images spread over the list exist under ``root``.

    A few missing images are normal (they are skipped and counted while training); all of them missing
    means ``data.image_root`` points at the wrong folder, which is better said now than as 100% skipped
    samples later. Only ``probes`` ``stat`` calls, so a million-image set still opens at once.
    """
    count = len(relative_paths)
    if count == 0:
        return
    taken = min(probes, count)
    positions = sorted({round(i * (count - 1) / max(taken - 1, 1)) for i in range(taken)})
    if any((root / relative_paths[i]).is_file() for i in positions):
        return
    example = relative_paths[positions[0]]
    raise FileNotFoundError(
        f"data.kind={kind!r}: none of {len(positions)} images listed in {origin} were found under {str(root)!r} "
        f"(e.g. {str(root / example)!r}); set data.image_root to the folder that holds {example!r}"
    )


def shipped_classnames() -> list[str]:
    """Names of the class-name lists shipped with clipforge (``fashion-mnist``, ...)."""
    return sorted(
        p.name.removesuffix(".txt") for p in files(SHIPPED_CLASSNAMES_PACKAGE).iterdir() if p.name.endswith(".txt")
    )


def load_classnames(spec: str, kind: str) -> list[str] | dict[str, str]:
    """Class names from a file or a shipped list, as ``data.classnames`` gives them.

    ``spec``: a ``.json`` file holding a list (names in label order) or an object (folder or raw name ->
    readable name); any other file: one name per line (blank lines ignored); or the name of a shipped
    list (``fashion-mnist``).
    """
    path = Path(spec)
    if not path.is_file():
        shipped = files(SHIPPED_CLASSNAMES_PACKAGE) / f"{spec}.txt"
        if shipped.is_file():
            return _lines(shipped.read_text(encoding="utf-8"))
        raise FileNotFoundError(
            f"data.kind={kind!r}: data.classnames={spec!r} is neither a file nor a shipped list; expected a JSON "
            f"list (or object) or a text file with one class name per line, or one of {shipped_classnames()}"
        )
    if path.suffix.lower() == ".json":
        names = read_json(path, kind, "a JSON list of class names, or an object mapping folder names to names")
        if isinstance(names, list) and all(isinstance(name, str) for name in names):
            return names
        if isinstance(names, dict) and all(isinstance(name, str) for name in names.values()):
            return names
        raise DataError(
            f"data.kind={kind!r}: classnames file {path} holds {type(names).__name__} {str(names)[:60]!r}; expected "
            "a JSON list of strings (in label order) or an object mapping folder names to readable names"
        )
    return _lines(read_text(path, f"data.kind={kind!r}: classnames file {path}"))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def classnames_for(spec: str, kind: str, num_classes: int, default: Sequence[str]) -> list[str]:
    """``num_classes`` names in label order: from ``spec`` (see :func:`load_classnames`) or ``default``.

    A mapping is looked up by the default names (e.g. folder names or raw ids); a list must have exactly
    ``num_classes`` names.
    """
    if not spec:
        return list(default)
    names = load_classnames(spec, kind)
    if isinstance(names, dict):
        missing = [name for name in default if name not in names]
        if missing:
            raise DataError(f"data.kind={kind!r}: data.classnames={spec!r} has no readable name for {missing[:5]}")
        return [names[name] for name in default]
    if len(names) != num_classes:
        raise DataError(
            f"data.kind={kind!r}: data.classnames={spec!r} lists {len(names)} names but the data has "
            f"{num_classes} classes; expected one name per class, in label order"
        )
    return names
