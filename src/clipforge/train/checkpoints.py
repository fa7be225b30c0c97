"""A training run's checkpoints: the typed :class:`~clipforge.checkpoint.Checkpoint` of the run as it stands, and
where it is written (``last.pt``, ``step_<N>.pt``, ``best.pt``)."""

from __future__ import annotations

from pathlib import Path

from clipforge.checkpoint import Checkpoint, TrainingState, save_checkpoint
from clipforge.distributed import wrap
from clipforge.runtime import rng_state
from clipforge.train.setup import TrainingRun
from clipforge.train.state import RunState


def run_checkpoint(run: TrainingRun, state: RunState) -> Checkpoint:
    """The checkpoint of the run after ``state.step`` steps; a collective under FSDP2 (every rank calls it, rank 0
    gets the full weights)."""
    training = TrainingState(
        optimizer=wrap.optimizer_state(run.train_model, run.optimizer),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler is not None else {},
        rng=rng_state(run.context.device),
        eval=run.evaluator.state_dict(),
        world_size=run.context.world_size,
        **state.state_dict(),  # samples_seen, data_streams, skipped_images
    )
    return Checkpoint(
        config=run.config,
        processor=run.processor,
        weights=wrap.model_state(run.train_model),
        step=state.step,
        hf_text_config=run.hf_text_config,
        training=training,
        ema=run.ema.state_dict() if run.ema is not None else None,
    )


def write_checkpoints(run: TrainingRun, state: RunState) -> Path:
    """``last.pt`` and, with ``train.keep_checkpoints``, ``step_<N>.pt`` (the oldest beyond that many removed)."""
    checkpoint = run_checkpoint(run, state)
    output_dir, keep = run.output_dir, run.config.train.keep_checkpoints
    state.saved_step = state.step
    if not run.context.is_main:
        return output_dir / "last.pt"
    last = save_checkpoint(output_dir / "last.pt", checkpoint, replace=True)
    if keep > 0:
        save_checkpoint(output_dir / f"step_{state.step}.pt", checkpoint, replace=True)
        numbered = sorted(output_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for old in numbered[:-keep]:
            old.unlink()
    return last


def write_best(run: TrainingRun, state: RunState) -> None:
    """``best.pt``: the run as it stands, after an evaluation that improved the best metric (a collective)."""
    checkpoint = run_checkpoint(run, state)
    if run.context.is_main:
        save_checkpoint(run.output_dir / "best.pt", checkpoint, replace=True)
