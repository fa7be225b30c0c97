"""The training run: one straight path from config to checkpoints.

Gradient accumulation keeps the full contrastive batch (GradCache, Gao et al. 2021): with
``train.accumulation_steps = K`` the batch of B pairs is split into K micro-batches, and

1. the embeddings of every micro-batch are computed without building autograd graphs;
2. the loss over all B x B pairs is computed on those embeddings, and backpropagated to them
   (and to the logit scale/bias): that gives dL/d(embedding) for every sample;
3. each micro-batch is run again with the same random state (dropout), now with a graph, and its
   embeddings are backpropagated with their slice of dL/d(embedding).

The parameter gradients then equal those of one step on the whole batch, while only one
micro-batch's activations are alive at a time. (Towers with BatchNorm normalize per micro-batch,
which no accumulation scheme avoids; their running statistics are updated once, in step 3.)

Several processes (torchrun; ``clipforge.distributed``, ``clipforge.distributed.wrap``): each loads
``batch_size / world_size`` pairs, the loss gathers (CLIP) or passes around (SigLIP) the other ranks'
features, and the step is still exact over the global batch. With GradCache, step 2 runs the distributed
loss on every rank's cached embeddings, and step 3 replays the micro-batches without gradient
synchronisation except the last, so gradients cross the network once per optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.checkpoint import build_model, hf_text_config, read_checkpoint, save_checkpoint
from clipforge.config import Config, ConfigError, config_to_dict, save_config
from clipforge.data.base import ImageTextSource
from clipforge.data.loader import build_train_loader
from clipforge.data.samples import Batch
from clipforge.data.shards import ShardSource
from clipforge.data.sources import build_source
from clipforge.data.tokenize import Tokenizer, build_tokenizer
from clipforge.data.transforms import build_image_transform
from clipforge.distributed import (
    DistributedContext,
    all_reduce_sum,
    broadcast_object,
    close_distributed,
    gather_ints,
    init_distributed,
    wrap,
)
from clipforge.losses import build_loss
from clipforge.model import resolve_image_preprocess
from clipforge.model.registry import MAX_LOGIT_SCALE
from clipforge.runtime import autocast_context, resolve_device, rng_state, seed_everything, set_rng_state
from clipforge.train.cache_features import build_feature_cache
from clipforge.train.evaluation import TrainingEvaluator
from clipforge.train.optim import build_optimizer, build_scheduler
from clipforge.train.run_log import NullRunLogger, RunLogger

logger = logging.getLogger("clipforge")


@dataclass
class TrainResult:
    """Where the run went and what it logged."""

    output_dir: Path
    step: int
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def _embed(model: nn.Module, batch: Batch, autocast) -> tuple[torch.Tensor, ...]:
    """(image features, text features, logit scale, logit bias or None) through the model's forward, which a
    DDP/FSDP wrapper needs to see to synchronise gradients."""
    with autocast:
        output = model(batch.images, batch.input_ids, batch.attention_mask, **batch.tower_features())
    return (
        output["image_features"].float(),
        output["text_features"].float(),
        output["logit_scale"],
        output["logit_bias"],
    )


def _batchnorm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    buffers = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    buffers.append((buffer, buffer.clone()))
    return buffers


def backward_step(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: Batch,
    accumulation_steps: int,
    autocast: contextlib.AbstractContextManager,
    scaler: torch.amp.GradScaler | None,
    loss_multiplier: float = 1.0,
) -> torch.Tensor:
    """Accumulate the gradients of the contrastive loss over ``batch`` into ``.grad``; return the loss.

    With ``accumulation_steps > 1`` this is the exact GradCache step described in the module docstring.
    ``model`` is a :class:`CLIPModel` or its DDP/FSDP2 wrapper (see ``clipforge.distributed.wrap``);
    ``loss_multiplier`` multiplies the loss before backward: ``world_size`` under DDP/FSDP, which average
    gradients over ranks (``clipforge.distributed``). The returned loss is not multiplied.
    """

    def scaled(loss: torch.Tensor) -> torch.Tensor:
        loss = loss * loss_multiplier if loss_multiplier != 1 else loss
        return scaler.scale(loss) if scaler is not None else loss

    if accumulation_steps == 1:
        loss = loss_fn(*_embed(model, batch, autocast))
        scaled(loss).backward()
        return loss.detach()

    micro_batches = batch.split(accumulation_steps)
    cuda = batch.device.type == "cuda"
    rng_states, image_parts, text_parts = [], [], []
    saved_buffers = _batchnorm_buffers(model)
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append((torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None))
            image_features, text_features, logit_scale, logit_bias = _embed(model, micro, autocast)
            image_parts.append(image_features)
            text_parts.append(text_features)
        for buffer, value in saved_buffers:  # the replay below updates the statistics once
            buffer.copy_(value)
    all_image = torch.cat(image_parts).requires_grad_()
    all_text = torch.cat(text_parts).requires_grad_()
    # Stand-ins for the logit scale/bias: their gradients are handed to the real ones in the last replay,
    # inside a forward that DDP/FSDP see, so that they are synchronised with the rest.
    stand_ins = [
        p.detach().requires_grad_(p.requires_grad) if p is not None else None for p in (logit_scale, logit_bias)
    ]
    loss = loss_fn(all_image, all_text, *stand_ins)
    scaled(loss).backward()  # grads of the logit scale/bias stand-ins, and of every embedding
    image_grads = all_image.grad.split([len(p) for p in image_parts])
    text_grads = all_text.grad.split([len(p) for p in text_parts])
    for index, (micro, (cpu_state, cuda_state), image_grad, text_grad) in enumerate(
        zip(micro_batches, rng_states, image_grads, text_grads, strict=True)
    ):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        last = index == len(micro_batches) - 1
        with wrap.gradient_sync(model, enabled=last):
            image_features, *outputs = _embed(model, micro, autocast)
            roots, grads = [image_features, outputs[0]], [image_grad, text_grad]
            if last:
                for output, stand_in in zip(outputs[1:], stand_ins, strict=True):
                    if stand_in is not None and stand_in.grad is not None:
                        roots.append(output)
                        grads.append(stand_in.grad)
            torch.autograd.backward(roots, grads)
    return loss.detach()


def _training_captions(source: ImageTextSource | ShardSource) -> list[str]:
    if isinstance(source, ShardSource):
        return list(source.iter_captions())  # one pass over the shards' caption members, no image is read
    return [caption for index in range(len(source)) for caption in source.captions(index)]


def _endless(loader) -> Iterator[Batch]:
    yield from loader  # the sampler never ends: one iterator serves the whole run


def train(config: Config, resume: str | Path | None = None) -> TrainResult:
    """Train a model as ``config`` says; ``resume`` is a checkpoint path or ``"latest"``.

    A run resumed from the checkpoint of step k reaches the same weights at step n as a run that was
    never interrupted: model, optimizer, schedule, loss scaler, RNG (reseeded from the step) and the data
    position (samples consumed) all come back from the checkpoint. Under torchrun every process calls this;
    rank 0 logs and writes the checkpoints, which any number of processes can resume.
    """
    context = init_distributed(resolve_device(config.train.device))
    try:
        result = _train(config, resume, context)
    except BaseException:
        close_distributed(context, wait=False)
        raise
    close_distributed(context)
    return result


def _train(config: Config, resume: str | Path | None, context: DistributedContext) -> TrainResult:
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device, world_size = context.device, context.world_size
    if config.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if config.train.batch_size % (world_size * config.train.accumulation_steps):
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must split evenly over {world_size} processes and then "
            f"into train.accumulation_steps={config.train.accumulation_steps} micro-batches: use a multiple of "
            f"{world_size * config.train.accumulation_steps}"
        )
    if not context.is_main:
        logger.setLevel(logging.WARNING)  # one process tells the story; the others speak up only when wrong
    seed_everything(config.train.seed)

    state = None
    if resume is not None:
        resume_path = output_dir / "last.pt" if str(resume) == "latest" else Path(resume)
        state = read_checkpoint(resume_path)
        saved_model = state["config"]["model"]
        if saved_model != config_to_dict(config)["model"]:
            raise ConfigError(
                f"--resume {resume_path}: the checkpoint was trained with another model config; "
                "resume with the run's own config.yaml (saved next to the checkpoint)"
            )
    resumed_steps = gather_ints(int(state["step"]) if state is not None else -1)
    if len(set(resumed_steps)) > 1:
        raise ConfigError(
            f"--resume {resume}: the processes read different checkpoints (steps {resumed_steps} by rank); "
            "every node must see the same file (a shared filesystem)"
        )

    source = build_source(config.data)
    text_config = config.model.text
    if state is not None:
        tokenizer = Tokenizer.from_state_dict(state["tokenizer"])
    else:
        tokenizer = None
        if context.is_main:
            tokenizer = build_tokenizer(text_config.tokenizer, text_config.name, _training_captions(source))
        if context.enabled:  # rank 0 trains the vocabulary once; every rank then tokenizes alike
            tokenizer = Tokenizer.from_state_dict(broadcast_object(tokenizer.state_dict() if tokenizer else None))
    model = build_model(
        config, tokenizer, pretrained=state is None, text_config_json=state.get("hf_text_config") if state else None
    ).to(device)
    if state is not None:
        model.load_state_dict(state["model"])  # before sharding: FSDP2 shards the weights the model holds
    transform = build_image_transform(resolve_image_preprocess(config.model.image), config.data.augment)
    # locked towers' features, computed once (or found) before the model is wrapped for distribution
    cached_features = build_feature_cache(config, model, source, tokenizer, transform, device)
    train_model = wrap.prepare_model(model, config.train, context)
    loss_fn = build_loss(config.loss, distributed=context.enabled)
    optimizer = build_optimizer(model, config.optim, device, config.model)
    scheduler = build_scheduler(optimizer, config.schedule, config.train.steps)
    scaler = torch.amp.GradScaler("cuda") if config.train.precision == "fp16" else None
    # opens the eval sources now, so a wrong path fails before the first step rather than at the first eval
    evaluator = TrainingEvaluator(config, tokenizer, autocast_context(device, config.train.precision))

    # streams: the slot layout of a shard stream (see clipforge.data.streaming), kept from the run's start
    step, samples_seen, streams = 0, 0, max(1, config.data.num_workers)
    if state is not None:
        wrap.load_optimizer_state(train_model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        streams = int(state.get("data_streams") or streams)
        if not context.enabled:  # torch's generators are reseeded every step; this restores Python's and CUDA's
            set_rng_state(state["rng"], device)
        evaluator.load_state_dict(state.get("eval", {}))
        logger.info("resumed from %s at step %d (%d samples seen)", resume, step, samples_seen)
    if context.is_main:
        save_config(config, output_dir / "config.yaml")

    def checkpoint_state() -> dict[str, Any]:
        """The checkpoint payload; a collective under FSDP2 (every rank calls it, rank 0 gets the weights)."""
        return {
            "config": config_to_dict(config),
            "tokenizer": tokenizer.state_dict(),
            "hf_text_config": hf_text_config(model),
            "model": wrap.model_state(train_model),
            "optimizer": wrap.optimizer_state(train_model, optimizer),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step,
            "samples_seen": samples_seen,
            "data_streams": streams,
            "rng": rng_state(device),
            "eval": evaluator.state_dict(),
            "world_size": world_size,
        }

    def write_checkpoints() -> Path:
        payload = checkpoint_state()
        if not context.is_main:
            return output_dir / "last.pt"
        last = save_checkpoint(output_dir / "last.pt", payload)
        if config.train.keep_checkpoints > 0:
            save_checkpoint(output_dir / f"step_{step}.pt", payload)
            numbered = sorted(output_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            for old in numbered[: -config.train.keep_checkpoints]:
                old.unlink()
        return last

    # samples_seen counts the whole run's samples; each rank loads and has consumed its 1/world_size of them
    loader = build_train_loader(
        source,
        transform,
        tokenizer,
        text_config.context_length,
        config.train.batch_size // world_size,
        seed=config.train.seed,
        start_sample=samples_seen // world_size,
        num_workers=config.data.num_workers,
        rank=context.rank,
        world_size=world_size,
        pin_memory=device.type == "cuda",
        caption_sampling=config.data.caption_sampling,
        streams=streams,
        cached_features=cached_features,
    )
    batches = _endless(loader)
    autocast = autocast_context(device, config.train.precision)
    run_log = (
        RunLogger(
            output_dir,
            config.train.steps,
            step,
            tensorboard="tensorboard" in config.logging.backends,
            progress=config.logging.progress,
        )
        if context.is_main
        else NullRunLogger()
    )
    history: list[dict[str, Any]] = []
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync inside the step
    losses_in_window, samples_in_window, skipped_total = 0, 0, 0
    window_start = time.perf_counter()
    last_checkpoint = output_dir / "last.pt"
    model.train()
    try:
        while step < config.train.steps:
            batch = next(batches)
            samples_seen += config.train.batch_size
            if batch.skipped:
                skipped_total += len(batch.skipped)
                for bad in batch.skipped[: max(0, 5 - (skipped_total - len(batch.skipped)))]:
                    logger.warning("skipped unreadable image %s: %s", bad.where, bad.reason)
            sizes = gather_ints(len(batch))  # every rank's pairs: all ranks take or skip the step together
            if min(sizes) == 0 or sum(sizes) < 2:
                continue  # nothing to contrast; the samples are consumed and counted
            batch = batch.to(device)
            wrap.seed_step(config.train.seed, context.rank, step)
            optimizer.zero_grad(set_to_none=True)
            loss = backward_step(
                train_model, loss_fn, batch, config.train.accumulation_steps, autocast, scaler, world_size
            )
            wrap.finish_gradients(train_model)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            with torch.no_grad():  # the CLIP paper's cap on the temperature: scale <= 100
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            loss_sum += loss
            losses_in_window += 1
            samples_in_window += sum(sizes)
            run_log.advance()

            if step % config.logging.log_every == 0 or step == config.train.steps:
                elapsed = time.perf_counter() - window_start
                window_loss = all_reduce_sum(loss_sum.clone())  # the ranks' shares add up to the global loss
                record = {
                    "loss": window_loss.item() / losses_in_window,
                    "lr": scheduler.get_last_lr()[0],
                    "logit_scale": model.logit_scale.exp().item(),
                    "samples_per_second": samples_in_window / max(elapsed, 1e-9),
                    "skipped_images": sum(gather_ints(skipped_total)),
                }
                if model.logit_bias is not None:
                    record["logit_bias"] = model.logit_bias.item()
                run_log.log(step, record, show=("loss", "lr", "logit_scale", "samples_per_second"))
                history.append({"step": step, **record})
                loss_sum.zero_()
                losses_in_window, samples_in_window = 0, 0
                window_start = time.perf_counter()
            # DDP: rank 0 evaluates alone; FSDP2: every rank takes part (the weights are gathered), rank 0 logs
            if evaluator.due(step) and (context.is_main or wrap.is_sharded(train_model)):
                eval_started = time.perf_counter()
                with wrap.evaluation_view(train_model) as eval_model:
                    eval_record, improved = evaluator.run(eval_model, step)
                run_log.log(step, eval_record, show=evaluator.shown)
                if improved:
                    payload = checkpoint_state()
                    if context.is_main:
                        save_checkpoint(output_dir / "best.pt", payload)
                window_start += time.perf_counter() - eval_started  # evaluation is not training throughput
            if step % config.train.checkpoint_every == 0 or step == config.train.steps:
                last_checkpoint = write_checkpoints()
    except KeyboardInterrupt:
        # every finished step is worth keeping: save where we are, then stop as asked (not under FSDP2, whose
        # weights would have to be gathered from ranks that may be gone already)
        if not wrap.is_sharded(train_model):
            last_checkpoint = write_checkpoints()
        logger.warning("interrupted at step %d; resume with --resume %s", step, last_checkpoint)
        raise
    finally:
        run_log.close()
    if skipped_total:
        logger.warning("%d unreadable images were skipped in total", skipped_total)
    return TrainResult(output_dir, step, last_checkpoint, history)
