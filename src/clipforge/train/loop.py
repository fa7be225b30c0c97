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
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipforge.config import Config, ConfigError, config_to_dict, save_config
from clipforge.data.loader import Batch, build_train_loader
from clipforge.data.sources import ImageTextSource, build_source
from clipforge.data.tokenize import Tokenizer, build_tokenizer
from clipforge.data.transforms import build_image_transform
from clipforge.losses import SigLipLoss, build_loss
from clipforge.model import CLIPModel, resolve_image_preprocess
from clipforge.model.registry import MAX_LOGIT_SCALE
from clipforge.train.checkpoint import build_model, hf_text_config, read_checkpoint, save_checkpoint
from clipforge.train.logging import RunLogger
from clipforge.train.optim import build_optimizer, build_scheduler

logger = logging.getLogger("clipforge")


@dataclass
class TrainResult:
    """Where the run went and what it logged."""

    output_dir: Path
    step: int
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu or auto")
    return device


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the towers; the loss is always computed in float32 outside it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _loss(loss_fn: nn.Module, model: CLIPModel, image_features: torch.Tensor, text_features: torch.Tensor):
    if isinstance(loss_fn, SigLipLoss):
        return loss_fn(image_features, text_features, model.logit_scale, model.logit_bias)
    return loss_fn(image_features, text_features, model.logit_scale)


def _embed(model: CLIPModel, batch: Batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast:
        image_features = model.encode_image(batch.images)
        text_features = model.encode_text(batch.input_ids, batch.attention_mask)
    return image_features.float(), text_features.float()


def _batchnorm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    buffers = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    buffers.append((buffer, buffer.clone()))
    return buffers


def backward_step(
    model: CLIPModel,
    loss_fn: nn.Module,
    batch: Batch,
    accumulation_steps: int,
    autocast: contextlib.AbstractContextManager,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor:
    """Accumulate the gradients of the contrastive loss over ``batch`` into ``.grad``; return the loss.

    With ``accumulation_steps > 1`` this is the exact GradCache step described in the module docstring.
    """

    def scaled(loss: torch.Tensor) -> torch.Tensor:
        return scaler.scale(loss) if scaler is not None else loss

    if accumulation_steps == 1:
        loss = _loss(loss_fn, model, *_embed(model, batch, autocast))
        scaled(loss).backward()
        return loss.detach()

    micro_batches = [
        Batch(images, input_ids, mask)
        for images, input_ids, mask in zip(
            batch.images.tensor_split(accumulation_steps),
            batch.input_ids.tensor_split(accumulation_steps),
            batch.attention_mask.tensor_split(accumulation_steps),
            strict=True,
        )
    ]
    cuda = batch.images.device.type == "cuda"
    rng_states, image_parts, text_parts = [], [], []
    saved_buffers = _batchnorm_buffers(model)
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append((torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None))
            image_features, text_features = _embed(model, micro, autocast)
            image_parts.append(image_features)
            text_parts.append(text_features)
        for buffer, value in saved_buffers:  # the replay below updates the statistics once
            buffer.copy_(value)
    all_image = torch.cat(image_parts).requires_grad_()
    all_text = torch.cat(text_parts).requires_grad_()
    loss = _loss(loss_fn, model, all_image, all_text)
    scaled(loss).backward()  # grads of the logit scale/bias, and of every embedding
    image_grads = all_image.grad.split([len(p) for p in image_parts])
    text_grads = all_text.grad.split([len(p) for p in text_parts])
    for micro, (cpu_state, cuda_state), image_grad, text_grad in zip(
        micro_batches, rng_states, image_grads, text_grads, strict=True
    ):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        image_features, text_features = _embed(model, micro, autocast)
        torch.autograd.backward([image_features, text_features], [image_grad, text_grad])
    return loss.detach()


def _training_captions(source: ImageTextSource) -> list[str]:
    return [caption for index in range(len(source)) for caption in source.captions(index)]


def _endless(loader) -> Iterator[Batch]:
    yield from loader  # the sampler never ends: one iterator serves the whole run


def train(config: Config, resume: str | Path | None = None) -> TrainResult:
    """Train a model as ``config`` says; ``resume`` is a checkpoint path or ``"latest"``.

    A run resumed from the checkpoint of step k reaches the same weights at step n as a run that was
    never interrupted: model, optimizer, schedule, loss scaler, RNG states and the data position
    (samples consumed) all come back from the checkpoint.
    """
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.train.device)
    if config.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32")
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

    source = build_source(config.data)
    text_config = config.model.text
    if state is not None:
        tokenizer = Tokenizer.from_state_dict(state["tokenizer"])
    else:
        tokenizer = build_tokenizer(text_config.tokenizer, text_config.name, _training_captions(source))
    model = build_model(
        config, tokenizer, pretrained=state is None, text_config_json=state.get("hf_text_config") if state else None
    ).to(device)
    transform = build_image_transform(resolve_image_preprocess(config.model.image), config.data.augment)
    loss_fn = build_loss(config.loss)
    optimizer = build_optimizer(model, config.optim, device)
    scheduler = build_scheduler(optimizer, config.schedule, config.train.steps)
    scaler = torch.amp.GradScaler("cuda") if config.train.precision == "fp16" else None

    step, samples_seen = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        _set_rng_state(state["rng"], device)
        logger.info("resumed from %s at step %d (%d samples seen)", resume, step, samples_seen)
    save_config(config, output_dir / "config.yaml")

    def checkpoint_state() -> dict[str, Any]:
        return {
            "config": config_to_dict(config),
            "tokenizer": tokenizer.state_dict(),
            "hf_text_config": hf_text_config(model),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step,
            "samples_seen": samples_seen,
            "rng": _rng_state(device),
        }

    def write_checkpoints() -> Path:
        payload = checkpoint_state()
        last = save_checkpoint(output_dir / "last.pt", payload)
        if config.train.keep_checkpoints > 0:
            save_checkpoint(output_dir / f"step_{step}.pt", payload)
            numbered = sorted(output_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            for old in numbered[: -config.train.keep_checkpoints]:
                old.unlink()
        return last

    batch_size = config.train.batch_size
    loader = build_train_loader(
        source,
        transform,
        tokenizer,
        text_config.context_length,
        batch_size,
        seed=config.train.seed,
        start_sample=samples_seen,
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = _endless(loader)
    autocast = autocast_context(device, config.train.precision)
    run_log = RunLogger(
        output_dir, config.train.steps, step, tensorboard=config.logging.tensorboard, progress=config.logging.progress
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
            samples_seen += batch_size
            if batch.skipped:
                skipped_total += len(batch.skipped)
                for bad in batch.skipped[: max(0, 5 - (skipped_total - len(batch.skipped)))]:
                    logger.warning("skipped unreadable image %s: %s", bad.where, bad.reason)
            if len(batch) < 2:
                continue  # nothing to contrast; the samples are consumed and counted
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = backward_step(model, loss_fn, batch, config.train.accumulation_steps, autocast, scaler)
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
            samples_in_window += len(batch)
            run_log.advance()

            if step % config.logging.log_every == 0 or step == config.train.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "loss": loss_sum.item() / losses_in_window,
                    "lr": scheduler.get_last_lr()[0],
                    "logit_scale": model.logit_scale.exp().item(),
                    "samples_per_second": samples_in_window / max(elapsed, 1e-9),
                    "skipped_images": skipped_total,
                }
                if model.logit_bias is not None:
                    record["logit_bias"] = model.logit_bias.item()
                run_log.log(step, record, show=("loss", "lr", "logit_scale", "samples_per_second"))
                history.append({"step": step, **record})
                loss_sum.zero_()
                losses_in_window, samples_in_window = 0, 0
                window_start = time.perf_counter()
            if step % config.train.checkpoint_every == 0 or step == config.train.steps:
                last_checkpoint = write_checkpoints()
    except KeyboardInterrupt:
        # every finished step is worth keeping: save where we are, then stop as asked
        last_checkpoint = write_checkpoints()
        logger.warning("interrupted at step %d; resume with --resume %s", step, last_checkpoint)
        raise
    finally:
        run_log.close()
    if skipped_total:
        logger.warning("%d unreadable images were skipped in total", skipped_total)
    return TrainResult(output_dir, step, last_checkpoint, history)
