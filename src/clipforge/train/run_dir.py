"""The run's output folder: one writer, never a run overwritten unasked, a run cleared when asked.

A folder **holds a run** when it has a checkpoint (``last.pt``, ``best.pt``, ``step_<N>.pt``) or a
``metrics.jsonl`` with at least one record. Training into it again starts only when the new run continues that
one (``--resume`` from a checkpoint in the folder) or replaces it (``--overwrite``: its checkpoints,
``metrics.jsonl`` and TensorBoard event files are removed, nothing else). A folder whose earlier run stopped
before its first step (a mistake found at start, Ctrl-C while building) holds no run: the next run simply uses it.

A ``config.yaml`` that clipforge did not write (no :data:`~clipforge.config.parsing.WRITTEN_HEADER`, in a folder
holding no run) is someone's own file: the run refuses the folder instead of writing over it.

One process writes a run folder at a time: rank 0 holds :func:`clipforge.io.folder_lock` on it for the whole
run, so a second ``clipforge train`` into the same folder - or a ``--resume latest`` while the first is alive -
stops at once naming the first one's pid. Whatever a killed process left half-written there (temporary files
of a checkpoint write) is removed when the lock is taken.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from clipforge.config import ConfigError
from clipforge.config.parsing import written_by_clipforge
from clipforge.distributed import gather_ints
from clipforge.folders import LOCK_NAME, folder_lock
from clipforge.io import FolderBusyError, OutputError, OutputExistsError
from clipforge.train.run_log import read_metrics

logger = logging.getLogger("clipforge")

CHECKPOINT_NAMES = ("last.pt", "best.pt")
# what clipforge.io.atomic_write leaves behind when a checkpoint write is killed: .<name>.<pid>.<random>.tmp
STALE_CHECKPOINT_TEMPORARIES = ".*.pt.*.tmp"


def run_files(output_dir: Path) -> list[Path]:
    """The files of a run in ``output_dir`` that ``--overwrite`` removes, in a stable order."""
    named = [output_dir / name for name in (*CHECKPOINT_NAMES, "metrics.jsonl")]
    numbered = sorted(output_dir.glob("step_*.pt"))
    events = sorted((output_dir / "tensorboard").rglob("events.out.tfevents.*"))
    return [path for path in [*named, *numbered, *events] if path.is_file()]


def run_evidence(output_dir: Path) -> str | None:
    """What shows that ``output_dir`` holds a run (the file's name), or None when it holds none."""
    for name in CHECKPOINT_NAMES:
        if (output_dir / name).is_file():
            return name
    numbered = sorted(output_dir.glob("step_*.pt"))
    if numbered:
        return numbered[0].name
    if read_metrics(output_dir / "metrics.jsonl"):
        return "metrics.jsonl"
    return None


def foreign_config(output_dir: Path) -> Path | None:
    """``output_dir/config.yaml`` when it is not a config clipforge wrote for a run, else None."""
    path = output_dir / "config.yaml"
    if not path.exists() or written_by_clipforge(path) or run_evidence(output_dir) is not None:
        return None  # (a run written before configs carried the header owns its config.yaml too)
    return path


def _refusal(output_dir: Path, resume_path: Path | None, overwrite: bool) -> Exception | None:
    """Why training into ``output_dir`` would lose something unasked (or contradicts itself); None if it is fine."""
    if output_dir.exists() and not output_dir.is_dir():
        return OutputExistsError(f"train.output_dir={output_dir} is a file; choose a folder")
    continues_here = resume_path is not None and resume_path.resolve().parent == output_dir.resolve()
    if overwrite and continues_here:
        return ConfigError(
            f"--overwrite would delete the run in {output_dir}, which --resume {resume_path} continues; "
            "drop --overwrite to continue it, or set train.output_dir to another folder"
        )
    foreign = foreign_config(output_dir)
    if foreign is not None:
        return OutputExistsError(
            f"train.output_dir={output_dir} holds a config.yaml that clipforge did not write ({foreign}); a run "
            "writes its resolved config there: move that file, or set train.output_dir to another folder"
        )
    found = run_evidence(output_dir)
    if found is None or overwrite or continues_here:
        return None
    if resume_path is not None:
        return FileExistsError(
            f"train.output_dir={output_dir} holds another run ({found}) than the one --resume {resume_path} "
            "continues: add --overwrite to replace it, or set train.output_dir to another folder"
        )
    return FileExistsError(
        f"train.output_dir={output_dir} already holds a run ({found}): continue it with --resume latest, or "
        "start it again with --overwrite (removes its checkpoints, metrics.jsonl and TensorBoard logs), or set "
        "train.output_dir to another folder"
    )


def _agree(refusal: Exception | None, output_dir: Path) -> None:
    """Raise ``refusal`` on this process and a matching error on every other (a collective: all ranks call it),
    so a refusal on one never leaves the others waiting in the next collective."""
    refused_by = [rank for rank, refused in enumerate(gather_ints(refusal is not None)) if refused]
    if refusal is not None:
        raise refusal
    if refused_by:
        raise FileExistsError(
            f"process {refused_by[0]} refused train.output_dir={output_dir} (see its message); every process "
            "must see the same folder"
        )


def check_output_dir(output_dir: Path, resume_path: Path | None, overwrite: bool) -> None:
    """Refuse, on every process together, a run that would overwrite another unasked (:func:`_refusal`).

    Raises ``FileExistsError`` / ``OutputError`` / ``ConfigError`` before anything is written.
    """
    _agree(_refusal(output_dir, resume_path, overwrite), output_dir)


@contextlib.contextmanager
def run_lock(output_dir: Path, is_main: bool) -> Iterator[None]:
    """Hold ``output_dir``'s writer lock on rank 0 for the block (a collective: every rank enters it together).

    A second writer stops with :class:`~clipforge.io.FolderBusyError` naming the first one's pid, on every rank.
    A run that fails before writing anything leaves no folder behind when it made the folder itself.
    """
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    refusal: Exception | None = None
    made_here = not output_dir.exists()
    if is_main:
        lock = folder_lock(output_dir, "train")
        try:
            lock.__enter__()
        except (FolderBusyError, OutputError) as error:
            refusal, lock = error, contextlib.nullcontext()
    _agree(refusal, output_dir)
    try:
        yield
    except BaseException:
        lock.__exit__(None, None, None)
        if is_main and made_here and [path.name for path in output_dir.iterdir()] == [LOCK_NAME]:
            (output_dir / LOCK_NAME).unlink()
            output_dir.rmdir()
        raise
    lock.__exit__(None, None, None)


def resume_checkpoint(resume: str | Path | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names: a path, or ``latest`` = ``<output_dir>/last.pt``; None = a fresh run.

    ``latest`` in a folder that has no ``last.pt`` yet (a first attempt that stopped before its first checkpoint,
    or no attempt at all) starts the run afresh, with a warning: the same command then both starts and
    continues a run, as a job that is restarted until it is done needs.
    """
    if resume is None:
        return None
    if str(resume) != "latest":
        return Path(resume)
    latest = output_dir / "last.pt"
    if latest.is_file():
        return latest
    logger.warning("--resume latest: %s has no last.pt yet, so the run starts from step 0", output_dir)
    return None


def remove_run_files(output_dir: Path) -> list[Path]:
    """``--overwrite``: delete the earlier run's files (see :func:`run_files`); returns what was removed."""
    removed = run_files(output_dir)
    for path in removed:
        path.unlink()
    if removed:
        shown = ", ".join(str(path.relative_to(output_dir)) for path in removed)
        logger.info("--overwrite: removed the earlier run's %s from %s", shown, output_dir)
    return removed


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete the temporary files that a killed checkpoint write left in ``output_dir``; returns them.

    Only one process writes a run's checkpoints, and it holds the folder's lock, so any such file is from an
    earlier process that died mid-write (``kill -9``, a lost node), each as large as a checkpoint.
    """
    removed = sorted(output_dir.glob(STALE_CHECKPOINT_TEMPORARIES))
    for path in removed:
        size = path.stat().st_size
        path.unlink()
        logger.info("removed %s (%.1f MB), left by an interrupted checkpoint write", path, size / 1e6)
    return removed
