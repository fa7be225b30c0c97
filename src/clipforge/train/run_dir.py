"""The run's output folder: never overwrite a run unasked, clear one when asked, sweep stale temporaries.

A folder holds a run when it has ``last.pt`` or ``metrics.jsonl``. Training into it again starts only when
the new run continues that one (``--resume`` from a checkpoint in the folder) or replaces it (``--overwrite``:
its checkpoints, ``metrics.jsonl`` and TensorBoard event files are removed, nothing else: ``config.yaml`` is
rewritten anyway and the feature cache is keyed by its contents).
"""

from __future__ import annotations

import logging
from pathlib import Path

from clipforge.config import ConfigError
from clipforge.distributed import gather_ints

logger = logging.getLogger("clipforge")

RUN_MARKERS = ("last.pt", "metrics.jsonl")
# what clipforge.io.atomic_write leaves behind when a checkpoint write is killed: .<name>.<random>.tmp
STALE_CHECKPOINT_TEMPORARIES = ".*.pt.*.tmp"


def run_files(output_dir: Path) -> list[Path]:
    """The files of a run in ``output_dir`` that ``--overwrite`` removes, in a stable order."""
    named = [output_dir / name for name in ("last.pt", "best.pt", "metrics.jsonl")]
    numbered = sorted(output_dir.glob("step_*.pt"))
    events = sorted((output_dir / "tensorboard").rglob("events.out.tfevents.*"))
    return [path for path in [*named, *numbered, *events] if path.is_file()]


def _refusal(output_dir: Path, resume_path: Path | None, overwrite: bool) -> Exception | None:
    """Why training into ``output_dir`` would lose something unasked (or contradicts itself); None if it is fine."""
    continues_here = resume_path is not None and resume_path.resolve().parent == output_dir.resolve()
    if overwrite and continues_here:
        return ConfigError(
            f"--overwrite would delete the run in {output_dir}, which --resume {resume_path} continues; "
            "drop --overwrite to continue it, or set train.output_dir to another folder"
        )
    found = [name for name in RUN_MARKERS if (output_dir / name).is_file()]
    if not found or overwrite or continues_here:
        return None
    if resume_path is not None:
        return FileExistsError(
            f"train.output_dir={output_dir} holds another run ({found[0]}) than the one --resume {resume_path} "
            "continues: add --overwrite to replace it, or set train.output_dir to another folder"
        )
    return FileExistsError(
        f"train.output_dir={output_dir} already holds a run ({found[0]}): continue it with --resume latest, or "
        "start it again with --overwrite (removes its checkpoints, metrics.jsonl and TensorBoard logs), or set "
        "train.output_dir to another folder"
    )


def check_output_dir(output_dir: Path, resume_path: Path | None, overwrite: bool) -> None:
    """Refuse, on every process together, a run that would overwrite another unasked.

    A collective: every rank looks at the folder and the ranks agree, so a refusal on one never leaves the
    others waiting in the next collective. Raises ``FileExistsError`` or ``ConfigError`` before anything is written.
    """
    refusal = _refusal(output_dir, resume_path, overwrite)
    refused_by = [rank for rank, refused in enumerate(gather_ints(refusal is not None)) if refused]
    if refusal is not None:
        raise refusal
    if refused_by:
        raise FileExistsError(
            f"process {refused_by[0]} refused train.output_dir={output_dir} (see its message); every process "
            "must see the same folder"
        )


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

    Only one process writes a run's checkpoints, and it calls this before its first write, so any such file
    is from an earlier process that died mid-write (``kill -9``, a lost node), each as large as a checkpoint.
    """
    removed = sorted(output_dir.glob(STALE_CHECKPOINT_TEMPORARIES))
    for path in removed:
        size = path.stat().st_size
        path.unlink()
        logger.info("removed %s (%.1f MB), left by an interrupted checkpoint write", path, size / 1e6)
    return removed
