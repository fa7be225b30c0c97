"""The training run: one straight path from config to checkpoints.

:func:`train` checks what it can before building anything (the config against the processes, the output
folder, the resumed checkpoint, the data), builds the run once (:class:`TrainingRun`: tokenizer, model,
optimizer, schedule, evaluator, loader), then takes optimizer steps until ``train.steps``, logging, evaluating
and checkpointing on the way. Everything that changes from step to step lives in one :class:`RunState`
(``clipforge.train.state``); the functions below read the run and update the state.

Gradient accumulation keeps the full contrastive batch (GradCache, see :mod:`clipforge.train.gradcache`).

Several processes (torchrun; ``clipforge.distributed``, ``clipforge.distributed.wrap``): each loads
``batch_size / world_size`` pairs, the loss gathers (CLIP) or passes around (SigLIP) the other ranks'
features, and the step is still exact over the global batch. With GradCache, the loss on the cached
embeddings is the distributed one, and gradients cross the network once per optimizer step.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.checkpoint import read_checkpoint
from clipforge.config import Config, ConfigError
from clipforge.config.errors import Interrupted
from clipforge.cores import resolve_workers
from clipforge.data.samples import Batch
from clipforge.data.sources import build_source
from clipforge.distributed import (
    DistributedContext,
    all_reduce_sum,
    close_distributed,
    gather_ints,
    init_distributed,
    wrap,
)
from clipforge.interop.load import run_start
from clipforge.model.registry import MAX_LOG_LOGIT_SCALE
from clipforge.runtime import keep_freed_memory_in_the_heap, resolve_device, seed_everything
from clipforge.train import interrupt, preflight, resume, run_dir, setup
from clipforge.train.checkpoints import write_best, write_checkpoints
from clipforge.train.gradcache import backward_step
from clipforge.train.log_backends import import_backends
from clipforge.train.setup import TrainingRun
from clipforge.train.state import LogWindow, RunState

__all__ = ["TrainResult", "TrainingRun", "backward_step", "train"]

logger = logging.getLogger("clipforge")

# unreadable images named one by one in the log; the rest are only counted
WARNED_SKIPS = 5
COMPILE_NOTE = "compiling the towers with torch.compile (inductor); the first steps take longer"


@dataclass
class TrainResult:
    """Where the run went and what it logged; ``is_main``: this is the process that logs (rank 0)."""

    output_dir: Path
    step: int
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True


def train(config: Config, resume: str | Path | None = None, overwrite: bool = False) -> TrainResult:
    """Train a model as ``config`` says; ``resume`` is a checkpoint path or ``"latest"``.

    A run resumed from the checkpoint of step k reaches the same weights at step n as a run that was
    never interrupted: model, optimizer, schedule, loss scaler, RNG (reseeded from the step) and the data
    position (samples consumed) all come back from the checkpoint. Under torchrun every process calls this;
    rank 0 logs and writes the checkpoints, which any number of processes can resume.

    ``train.output_dir`` holding a run (``last.pt`` or ``metrics.jsonl``) is refused unless ``resume`` continues
    it or ``overwrite`` is set: then that run's checkpoints and logs are removed first (``clipforge.train.run_dir``).
    On Linux it also sets the process's allocator to keep freed blocks (``keep_freed_memory_in_the_heap``).
    """
    keep_freed_memory_in_the_heap()
    context = init_distributed(resolve_device(config.train.device))
    try:
        with run_dir.run_lock(Path(config.train.output_dir), context.is_main):
            result = _train(config, resume, overwrite, context)
    except BaseException:
        close_distributed(context, wait=False)
        raise
    close_distributed(context)
    return result


def _train(config: Config, resume_from: str | Path | None, overwrite: bool, context: DistributedContext) -> TrainResult:
    """Check (nothing built or written yet), build, restore, prepare the folder, run."""
    output_dir = Path(config.train.output_dir)
    _check_processes(config, context)
    if not context.is_main:
        logger.setLevel(logging.WARNING)  # one process tells the story; the others speak up only when wrong
    seed_everything(config.train.seed)
    resume_path = run_dir.resume_checkpoint(resume_from, output_dir)
    if resume_path is None and resume_from is not None:  # --resume latest, nothing saved yet: start afresh,
        overwrite = overwrite or run_dir.run_evidence(output_dir) == "metrics.jsonl"  # the stopped attempt's log too
    checkpoint = read_checkpoint(resume_path) if resume_path is not None else None
    # where the weights come from (the checkpoint, model.init, or a new model) is decided once, here
    start = run_start(config, checkpoint)
    config = start.config
    if checkpoint is not None:
        resume.check_resume_checkpoint(checkpoint, resume_path, config)
        if context.is_main:
            for message in resume.schedule_changes(checkpoint.config, config, checkpoint.step):
                logger.warning(message)
        start.config = config = resume.effective_config(checkpoint.config, config)
    resume.check_same_checkpoint_everywhere(checkpoint, resume_from)
    run_dir.check_output_dir(output_dir, resume_path, overwrite)
    if context.is_main:  # a missing W&B/MLflow package is named before anything is built, written or removed
        import_backends(config.logging.backends)
    source = build_source(config.data)
    preflight.check_batch_fits(source, config.data, config.train.batch_size, context.world_size)
    preflight.check_images_decode(source, config.data)

    output_dir.mkdir(parents=True, exist_ok=True)
    run, cached_features = setup.build_run(start, context, output_dir, source)
    state = RunState(
        data_streams=max(1, resolve_workers(config.data.num_workers)),
        window=LogWindow.on(context.device),
        last_checkpoint=output_dir / "last.pt",
    )
    if checkpoint is not None:
        setup.restore(run, state, checkpoint, resume_path)
    if context.is_main:
        setup.prepare_output_dir(run, resume_path, checkpoint, overwrite)
    run.batches = setup.batches(run, source, cached_features, state)
    run.run_log = setup.run_logger(run, state, source)
    return _run(run, state)


def _check_processes(config: Config, context: DistributedContext) -> None:
    """What the config asks of the device and the number of processes, checked before anything runs."""
    if config.train.precision == "fp16" and context.device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    world_size, accumulation_steps = context.world_size, config.train.accumulation_steps
    if config.train.batch_size % (world_size * accumulation_steps):
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must split evenly over {world_size} processes and then "
            f"into train.accumulation_steps={accumulation_steps} micro-batches: use a multiple of "
            f"{world_size * accumulation_steps}"
        )


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def _run(run: TrainingRun, state: RunState) -> TrainResult:
    """Steps until ``train.steps``; on SIGINT/SIGTERM the step in progress finishes, the run saves and stops
    (:mod:`clipforge.train.interrupt`)."""
    run.model.train()
    if run.config.train.compile:
        logger.info(COMPILE_NOTE)
    state.window.reset()
    try:
        with interrupt.deferred_stop() as stop:
            while state.step < run.config.train.steps and not stop.requested:
                _advance(run, state, stop)
            if stop.requested:
                _stop(run, state, stop)
    finally:
        run.run_log.close()
    if state.skipped_images:
        logger.warning("%d unreadable images were skipped in total", state.skipped_images)
    return TrainResult(run.output_dir, state.step, state.last_checkpoint, state.history, run.context.is_main)


def _advance(run: TrainingRun, state: RunState, stop: interrupt.StopRequest) -> None:
    """One batch: an optimizer step on it (then log, evaluate, checkpoint as due), or past it when it holds
    fewer than 2 readable pairs on some rank (its samples are consumed and counted all the same).

    A stop asked for on any rank while the batch was loading leaves it unconsumed: every rank reports its pairs,
    or -1 for a stop, in the one per-step gather, so all ranks stop before the same step.
    """
    config, context = run.config, run.context
    batch = next(run.batches)
    sizes = gather_ints(-1 if stop.requested else len(batch))  # all ranks take, skip or stop together
    if min(sizes) < 0:
        stop.signum = stop.signum or signal.SIGTERM  # another rank's request: stop with this one
        return
    state.samples_seen += config.train.batch_size
    _count_skipped(batch, sizes, state, config.train.batch_size)
    if min(sizes) == 0 or sum(sizes) < 2:
        state.empty_batches += 1
        if state.empty_batches >= preflight.MAX_EMPTY_BATCHES:
            raise preflight.empty_batches_error(
                config.data, state.empty_batches, config.train.batch_size, state.skipped_images
            )
        return
    state.empty_batches = 0
    loss, grad_norm, state.lr = _optimizer_step(run, batch.to(context.device), state.step)
    state.step += 1
    if run.ema is not None:
        run.ema.update(state.step)
    state.window.add(loss, grad_norm, sum(sizes))
    run.run_log.advance()
    if state.step % config.logging.log_every == 0 or state.step == config.train.steps:
        _log_window(run, state)
    # DDP: rank 0 evaluates alone; FSDP2: every rank takes part (the weights are gathered), rank 0 logs
    if run.evaluator.due(state.step) and (context.is_main or wrap.is_sharded(run.train_model)):
        _evaluate(run, state)
    if state.step % config.train.checkpoint_every == 0 or state.step == config.train.steps:
        state.last_checkpoint = write_checkpoints(run, state)


def _count_skipped(batch: Batch, sizes: list[int], state: RunState, batch_size: int) -> None:
    """Name the first unreadable images in the log, and count every rank's: each rank's batch holds
    ``batch_size / world_size`` samples, taken or skipped, so the skipped ones are what ``sizes`` lacks."""
    for bad in batch.skipped[: max(0, WARNED_SKIPS - state.skipped_images)]:
        logger.warning("skipped unreadable image %s: %s", bad.where, bad.reason)
    state.skipped_images += batch_size - sum(sizes)


def _optimizer_step(run: TrainingRun, batch: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Step ``step`` (0-based) on ``batch``: (loss, gradient norm before clipping, the learning rate used).

    The loss and norm stay on the device; the learning rate is read before ``scheduler.step()`` moves it on.
    """
    config, optimizer, scaler = run.config, run.optimizer, run.scaler
    wrap.seed_step(config.train.seed, run.context.rank, step)
    optimizer.zero_grad(set_to_none=True)
    loss = backward_step(
        run.train_model,
        run.loss_fn,
        batch,
        config.train.accumulation_steps,
        run.autocast,
        scaler,
        run.context.world_size,
    )
    wrap.finish_gradients(run.train_model)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = _clip_gradients(run.model, config.train.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    with torch.no_grad():  # the CLIP paper's cap on the temperature, 1 <= t <= 100, kept on the parameter log t
        run.model.log_logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)
    return loss, grad_norm, lr


def _clip_gradients(model: nn.Module, grad_clip: float) -> torch.Tensor:
    """Clip the global L2 gradient norm to ``grad_clip`` (0: no clipping) and return the norm before clipping.

    With ``grad_clip=0`` the norm is still computed (``max_norm=inf``: every gradient is multiplied by 1). Under
    FSDP2 the norm is a DTensor; its full value is taken on the device, so no step waits for the host.
    """
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full_tensor = getattr(grad_norm, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else grad_norm).detach()


def _log_window(run: TrainingRun, state: RunState) -> None:
    """Write one training record (means over the window's steps) and start a new window."""
    window, model = state.window, run.model
    elapsed = time.perf_counter() - window.started
    window_loss = all_reduce_sum(window.loss_sum.clone())  # the ranks' shares add up to the global loss
    record = {
        "loss": window_loss.item() / window.steps,
        "lr": state.lr,
        "grad_norm": window.grad_norm_sum.item() / window.steps,
        "logit_scale": model.log_logit_scale.exp().item(),  # the multiplier t, as everywhere but the parameter
        "samples_per_second": window.samples / max(elapsed, 1e-9),
        "skipped_images": state.skipped_images,
    }
    if model.logit_bias is not None:
        record["logit_bias"] = model.logit_bias.item()
    run.run_log.log(state.step, record, show=("loss", "lr", "logit_scale", "samples_per_second"))
    state.history.append({"step": state.step, **record})
    window.reset()


def _evaluate(run: TrainingRun, state: RunState) -> None:
    """Run the evaluation tasks, log them, and write ``best.pt`` when the best metric improved."""
    started = time.perf_counter()
    with wrap.evaluation_view(run.train_model) as eval_model:
        record, improved = run.evaluator.run(eval_model, state.step)
    run.run_log.log(state.step, record, show=run.evaluator.shown)
    if improved:
        write_best(run, state)
    state.window.started += time.perf_counter() - started  # evaluation is not training throughput


def _stop(run: TrainingRun, state: RunState, stop: interrupt.StopRequest) -> None:
    """Save the state after the last finished step (unless ``last.pt`` holds it already) and end the command
    with :class:`Interrupted` (exit code 130 for SIGINT, 143 for SIGTERM)."""
    if state.saved_step != state.step:
        state.last_checkpoint = write_checkpoints(run, state)
    where = run.output_dir if state.step > 0 else None
    raise Interrupted(
        f"stopped by {stop.name} after step {state.step}"
        + (f"; continue with --resume latest (train.output_dir={where})" if where else "; nothing was trained yet"),
        stop.exit_code,
    )
