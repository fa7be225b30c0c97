"""Building a training run: what it starts from, its parts, its restored state, its folder and its batches.

:func:`build_run` takes the run's :class:`~clipforge.interop.load.RunStart` (the one decision of where the weights
come from: a resumed checkpoint, ``model.init``, or a new model) and builds, in an order that keeps the random
stream (and so resume) exact: the processor (a new model's tokenizer is trained on the data's captions), the model,
the locked towers' feature cache, the distributed wrapper, the loss, the optimizer and schedule, the evaluator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.checkpoint import Checkpoint
from clipforge.config import Config, save_config
from clipforge.cores import resolve_workers
from clipforge.data.base import Source, capabilities_of
from clipforge.data.loader import LoaderSpec, build_train_loader
from clipforge.data.processor import Processor
from clipforge.data.samples import Batch
from clipforge.data.sources import training_captions
from clipforge.data.tokenize import Tokenizer, build_tokenizer
from clipforge.distributed import DistributedContext, broadcast_object, wrap
from clipforge.interop.load import RunStart
from clipforge.losses import build_loss
from clipforge.model import CLIPModel
from clipforge.model.factory import build_checked_model, build_model, check_trainable_size, make_processor
from clipforge.runtime import autocast_context, resolve_precision, set_rng_state, usable_workers
from clipforge.train import resume, run_dir
from clipforge.train.cache_features import build_feature_cache
from clipforge.train.ema import WeightAverage
from clipforge.train.evaluation import TrainingEvaluator
from clipforge.train.optim import build_optimizer, build_scheduler
from clipforge.train.run_log import NullRunLogger, RunLogger, start_summary
from clipforge.train.state import RunState

logger = logging.getLogger("clipforge")


@dataclass
class TrainingRun:
    """What a run builds at its start and then only uses (what changes is in :class:`RunState`).

    ``model`` is the :class:`CLIPModel`; ``train_model`` what the step calls: the model, its DDP wrapper, or
    the model sharded in place (FSDP2). ``processor`` turns the data into the model's inputs (and is saved in
    every checkpoint). ``ema``: the moving average of the trained weights (``train.ema``), or None. ``batches`` and
    ``run_log`` are set once the state is restored.
    """

    config: Config
    context: DistributedContext
    output_dir: Path
    processor: Processor
    model: CLIPModel
    train_model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    evaluator: TrainingEvaluator
    autocast: Any
    hf_text_config: str | None = None
    ema: WeightAverage | None = None
    batches: Iterator[Batch] = field(default_factory=lambda: iter(()))
    run_log: RunLogger | NullRunLogger = field(default_factory=NullRunLogger)


def _new_tokenizer(config: Config, context: DistributedContext, source: Source) -> Tokenizer:
    """A new model's tokenizer: trained on the data's captions (rank 0 trains it, every rank gets it) or loaded."""
    text_config = config.model.text
    tokenizer = None
    if context.is_main:
        tokenizer = build_tokenizer(text_config.tokenizer, text_config.name, training_captions(source))
    if context.enabled:  # rank 0 trains the vocabulary once; every rank then tokenizes alike
        tokenizer = Tokenizer.from_state_dict(broadcast_object(tokenizer.state_dict() if tokenizer else None))
    return tokenizer


def _model(start: RunStart, processor: Processor, device: torch.device) -> CLIPModel:
    """The run's model: the start's weights in the run's architecture (locks applied), or a new model whose size
    was checked first."""
    config = start.config
    if start.weights is not None:
        return build_checked_model(config, processor.tokenizer, start.weights, start.source, start.hf_text_config)
    check_trainable_size(config, processor.tokenizer, device)  # counted before anything is allocated
    return build_model(config, processor.tokenizer)


def build_run(
    start: RunStart, context: DistributedContext, output_dir: Path, source: Source
) -> tuple[TrainingRun, Any]:
    """The run's parts (module docstring), and the locked towers' feature cache, which only the loader needs."""
    config, device = start.config, context.device
    processor = start.processor or make_processor(config.model, _new_tokenizer(config, context, source))
    model = _model(start, processor, device).to(device)
    # locked towers' features, computed once (or found) before the model is wrapped for distribution
    cached_features = build_feature_cache(config, model, source, processor, device)
    train_model = wrap.prepare_model(model, config.train, context)
    optimizer = build_optimizer(model, config.optim, device, config.model)
    run = TrainingRun(
        config=config,
        context=context,
        output_dir=output_dir,
        processor=processor,
        model=model,
        train_model=train_model,
        loss_fn=build_loss(config.loss, distributed=context.enabled),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.schedule, config.train.steps),
        scaler=torch.amp.GradScaler("cuda") if config.train.precision == "fp16" else None,
        # opens the eval sources now, so a wrong path fails before the first step rather than at the first eval
        evaluator=TrainingEvaluator(config, processor, autocast_context(device, config.train.precision)),
        autocast=autocast_context(device, config.train.precision),
        hf_text_config=start.hf_text_config or model.text_tower.hf_config_json(),
        # after wrapping: under FSDP2 the average is sharded as the parameters are
        ema=WeightAverage(wrap.unwrap(train_model), config.train.ema) if config.train.ema.enabled else None,
    )
    return run, cached_features


def restore(run: TrainingRun, state: RunState, checkpoint: Checkpoint, resume_from: Path) -> None:
    """Optimizer, schedule, scaler, RNG, evaluator and run state as the checkpoint has them."""
    training = checkpoint.training
    if training is None:
        raise resume.not_a_training_checkpoint(resume_from)
    wrap.load_optimizer_state(run.train_model, run.optimizer, training.optimizer)
    run.scheduler.load_state_dict(training.scheduler)
    # the learning rate of the next step follows the run's schedule now (train.steps or schedule.* may have
    # changed on resume); the restored optimizer still holds the one the old schedule set after the last step
    resume.apply_schedule(run.optimizer, run.scheduler)
    if run.scaler is not None and training.scaler:
        run.scaler.load_state_dict(training.scaler)
    state.load(checkpoint.step, training)
    if not run.context.enabled:  # torch's generators are reseeded every step; this restores Python's and CUDA's
        set_rng_state(training.rng, run.context.device)
    run.evaluator.load_state_dict(training.eval)
    if run.ema is not None and checkpoint.ema is not None:
        run.ema.load_state_dict(checkpoint.ema)
    elif run.ema is not None:
        logger.info("train.ema: %s holds no weight average; it starts from the resumed weights", resume_from)
    if resume_from.resolve().parent != run.output_dir.resolve():
        state.saved_step = -1  # last.pt of this folder does not hold the resumed step yet
    logger.info("resumed from %s at step %d (%d samples seen)", resume_from, state.step, state.samples_seen)


def prepare_output_dir(
    run: TrainingRun, resume_path: Path | None, checkpoint: Checkpoint | None, overwrite: bool
) -> None:
    """Rank 0, once everything is built (a failed set-up loses nothing): clear the folder as asked, sweep stale
    temporaries, carry ``best.pt`` over from another folder, and write the config beside the checkpoints."""
    if overwrite:
        run_dir.remove_run_files(run.output_dir)
    run_dir.remove_stale_temporaries(run.output_dir)
    if checkpoint is not None and checkpoint.training is not None:
        resume.carry_best_checkpoint(resume_path, run.output_dir, checkpoint.training.eval)
    # the run's own file (run_dir refused a folder whose config.yaml is someone else's)
    save_config(run.config, run.output_dir / "config.yaml", replace=True)


def batches(run: TrainingRun, source, cached_features, state: RunState) -> Iterator[Batch]:
    """The endless batches of this rank, from where the state says the data stands (the loader is built now, so
    a mistake it finds surfaces before the first step)."""
    config, context = run.config, run.context
    # samples_seen counts the whole run's samples; each rank loads and has consumed its 1/world_size of them
    spec = LoaderSpec(
        run.processor,
        config.data.augment,
        config.train.batch_size // context.world_size,
        seed=config.train.seed,
        start_sample=state.samples_seen // context.world_size,
        num_workers=resolve_workers(config.data.num_workers),
        rank=context.rank,
        world_size=context.world_size,
        pin_memory=context.device.type == "cuda",
        caption_sampling=config.data.caption_sampling,
        streams=state.data_streams,
    )
    loader = build_train_loader(source, spec, cached_features=cached_features)
    return _endless(loader)


def _endless(loader) -> Iterator[Batch]:
    yield from loader  # the sampler never ends: one iterator serves the whole run


def run_logger(run: TrainingRun, state: RunState, source: Source | None = None) -> RunLogger | NullRunLogger:
    """Rank 0's logger (``logging.*``: metrics.jsonl, the backends, the progress bar or lines), after the run's
    start summary (``run_log.start_summary``); the other ranks log nothing."""
    if not run.context.is_main:
        return NullRunLogger()
    config, device = run.config, run.context.device
    parameters = list(run.model.parameters())
    random_access = source is not None and capabilities_of(source).random_access
    chosen = resolve_precision(config.train.precision, device)
    summary = start_summary(
        steps=config.train.steps,
        batch_size=config.train.batch_size,
        pairs=len(source) if random_access else None,
        data_kind=config.data.kind,
        parameters=sum(p.numel() for p in parameters),
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        device=device,
        processes=run.context.world_size,
        precision=chosen.precision,
        reason=chosen.reason,
        workers=usable_workers(config.data.num_workers),
    )
    for line in summary:
        logger.info(line)
    return RunLogger.for_run(run.config, run.output_dir, state.step)
