"""Resuming a run: find and check the checkpoint, say what a changed config does, carry ``best.pt`` along.

A resumed run continues the checkpoint's optimizer and schedule: its ``base_lrs`` and every parameter group's
``initial_lr`` come back from the file, while the schedule's shape (``train.steps``, ``schedule.*``) is the
current config's. Changing either on resume is allowed but rarely what one means, so it is said out loud.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint import Checkpoint
from clipforge.config import Config, ConfigError, config_to_dict
from clipforge.distributed import gather_ints
from clipforge.io import atomic_write
from clipforge.train.optim import lr_multiplier

logger = logging.getLogger("clipforge")


def check_resume_checkpoint(checkpoint: Checkpoint, resume_path: Path, config: Config) -> None:
    """Refuse the checkpoint read from ``resume_path`` when it was trained with another model config than
    ``config``'s."""
    if config_to_dict(checkpoint.config)["model"] != config_to_dict(config)["model"]:
        raise ConfigError(
            f"--resume {resume_path}: the checkpoint was trained with another model config; "
            "resume with the run's own config.yaml (saved next to the checkpoint)"
        )


def effective_config(saved: Config, config: Config) -> Config:
    """``config`` as a resumed run really trains it: the optimizer's settings (``optim.*``) are the checkpoint's,
    because its state - learning rates, weight decay, betas, eps - comes back from the file and overrides them.

    So the run's ``config.yaml`` and checkpoints say what runs; :func:`schedule_changes` warns about each
    setting that was asked for and has no effect.
    """
    return dataclasses.replace(config, optim=copy.deepcopy(saved.optim))


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every parameter group's learning rate to what ``scheduler`` gives at its current step.

    After a resume the restored optimizer holds the rate the checkpoint's schedule set after its last step; the
    run's schedule (``train.steps``, ``schedule.*``) may be another, and the next step must use its rate. With
    an unchanged schedule this sets the same values again, bit for bit.
    """
    step = scheduler.last_epoch
    rates = [base * multiplier(step) for base, multiplier in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports: the rate of the next step


def check_same_checkpoint_everywhere(checkpoint: Checkpoint | None, resume: str | Path | None) -> None:
    """Every process must resume from the same step (a collective: every rank calls it)."""
    resumed_steps = gather_ints(checkpoint.step if checkpoint is not None else -1)
    if len(set(resumed_steps)) > 1:
        raise ConfigError(
            f"--resume {resume}: the processes read different checkpoints (steps {resumed_steps} by rank); "
            "every node must see the same file (a shared filesystem)"
        )


def schedule_changes(saved: Config, config: Config, step: int) -> list[str]:
    """One sentence per schedule setting that differs between the checkpoint's config ``saved`` and ``config``.

    Each says what changed and what it does from ``step`` on: the learning rate there, before and after
    (``base lr * lr_multiplier``; the base is the checkpoint's, see the module docstring).
    """
    old_steps, new_steps = saved.train.steps, config.train.steps
    old_schedule, new_schedule = saved.schedule, config.schedule
    base_lr = saved.optim.lr
    before = base_lr * lr_multiplier(step, old_steps, old_schedule)
    after = base_lr * lr_multiplier(step, new_steps, new_schedule)
    moves = f"the learning rate at step {step} moves from {before:.3g} to {after:.3g}"
    messages = []
    if new_steps != old_steps:
        if step >= new_steps:
            consequence = f"the checkpoint is at step {step} already, so nothing is left to train"
        elif new_schedule.kind == "cosine":
            shape = "stretched" if new_steps > old_steps else "squeezed"
            consequence = f"the cosine schedule is {shape} from step {step} on ({moves})"
        else:
            consequence = f"the run now ends at step {new_steps}; the constant schedule is unchanged"
        messages.append(f"train.steps {old_steps} -> {new_steps} on resume: {consequence}")
    for key, new_value in dataclasses.asdict(new_schedule).items():
        old_value = getattr(old_schedule, key)
        if new_value != old_value:
            messages.append(
                f"schedule.{key} {old_value} -> {new_value} on resume: the learning rate follows the new "
                f"schedule from step {step} on ({moves})"
            )
    saved_optim = dataclasses.asdict(saved.optim)
    for key, new_value in dataclasses.asdict(config.optim).items():
        old_value = saved_optim[key]
        if float(new_value) != float(old_value):
            messages.append(
                f"optim.{key} {old_value} -> {new_value} on resume has no effect: the optimizer keeps the "
                f"checkpoint's {key} {old_value} (the run's config.yaml says so too); start a new run to train "
                "with another"
            )
    return messages


def _checkpoint_step(path: Path) -> int | None:
    """The ``step`` a checkpoint file holds, read without loading its tensors (None when it cannot be read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 - an unreadable best.pt is simply not carried over
        return None


def carry_best_checkpoint(resume_path: Path, output_dir: Path, eval_state: dict[str, Any]) -> Path | None:
    """Copy ``best.pt`` from the resumed checkpoint's folder into ``output_dir`` when the run moves folders.

    Only when ``output_dir`` has no ``best.pt`` yet and the source's is the one the checkpoint's evaluator
    state calls the best (same step): a ``best.pt`` written after the resumed step belongs to a continuation
    that this run replaces. Returns the copy, or None.
    """
    source, target = resume_path.parent / "best.pt", output_dir / "best.pt"
    if resume_path.parent.resolve() == output_dir.resolve() or target.exists() or not source.is_file():
        return None
    best_step = eval_state.get("best_step")
    source_step = _checkpoint_step(source)
    if best_step is None or source_step != best_step:
        logger.warning(
            "%s (step %s) is not the best of the resumed checkpoint (step %s); not copied to %s",
            source,
            source_step,
            best_step,
            output_dir,
        )
        return None
    with source.open("rb") as handle:
        atomic_write(target, lambda out: shutil.copyfileobj(handle, out))
    logger.info("copied %s (the best so far, step %d) to %s", source, best_step, target)
    return target


def not_a_training_checkpoint(path: Path) -> ConfigError:
    """The refusal of ``--resume`` from a checkpoint without a training state (one written by clipforge import)."""
    return ConfigError(
        f"--resume {path}: this checkpoint holds a model but no training state (it was written by clipforge import, "
        "or by an earlier run's export); start a run from it with model.init instead"
    )
