"""Gradient accumulation that keeps the full contrastive batch (GradCache, Gao et al. 2021).

With ``train.accumulation_steps = K`` the batch of B pairs is split into K micro-batches, and

1. the embeddings of every micro-batch are computed without building autograd graphs;
2. the loss over all B x B pairs is computed on those embeddings, and backpropagated to them
   (and to the multiplier t and the bias b): that gives dL/d(embedding) for every sample;
3. each micro-batch is run again with the same random state (dropout), now with a graph, and its
   embeddings are backpropagated with their slice of dL/d(embedding).

The parameter gradients then equal those of one step on the whole batch, while only one
micro-batch's activations are alive at a time. (Towers with BatchNorm normalize per micro-batch,
which no accumulation scheme avoids; their running statistics are updated once, in step 3.)

Under several processes, step 2 runs the distributed loss on every rank's cached embeddings, and step 3
replays the micro-batches without gradient synchronisation except the last, so gradients cross the network
once per optimizer step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from clipforge.data.samples import Batch
from clipforge.distributed import wrap


def _embed(model: nn.Module, batch: Batch, autocast) -> tuple[torch.Tensor | None, ...]:
    """(image embeddings, text embeddings, the multiplier t, the bias b or None) through the model's forward,
    which a DDP/FSDP wrapper needs to see to synchronise gradients: the loss's arguments, in its order."""
    with autocast:
        output = model(batch.images, batch.input_ids, batch.attention_mask, **batch.tower_features())
    return output.image_embeds.float(), output.text_embeds.float(), output.logit_scale, output.logit_bias


def _batchnorm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every training BatchNorm's running statistics, with a copy of their values now."""
    buffers = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    buffers.append((buffer, buffer.clone()))
    return buffers


@dataclass
class _EmbeddingCache:
    """Step 1's result: every micro-batch's embeddings (no graph), the random state each was drawn with, and
    the multiplier t and bias b as the forward returned them."""

    image_parts: list[torch.Tensor]
    text_parts: list[torch.Tensor]
    rng_states: list[tuple[torch.Tensor, torch.Tensor | None]]
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


def _embed_without_graph(model: nn.Module, micro_batches: list[Batch], autocast) -> _EmbeddingCache:
    """Step 1: embed every micro-batch under ``no_grad``, keeping the RNG state each started from."""
    cuda = micro_batches[0].device.type == "cuda"
    rng_states, image_parts, text_parts = [], [], []
    saved_buffers = _batchnorm_buffers(model)
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append((torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None))
            image_embeds, text_embeds, logit_scale, logit_bias = _embed(model, micro, autocast)
            image_parts.append(image_embeds)
            text_parts.append(text_embeds)
        for buffer, value in saved_buffers:  # the replay below updates the statistics once
            buffer.copy_(value)
    return _EmbeddingCache(image_parts, text_parts, rng_states, logit_scale, logit_bias)


def _replay(
    model: nn.Module,
    micro_batches: list[Batch],
    cache: _EmbeddingCache,
    image_grads: tuple[torch.Tensor, ...],
    text_grads: tuple[torch.Tensor, ...],
    stand_ins: list[torch.Tensor | None],
    autocast,
) -> None:
    """Step 3: each micro-batch again, with a graph and its RNG state, backpropagated with its embeddings'
    gradients; the last replay also hands the t and b stand-ins' gradients to the forward's t and b, whence
    they reach log_logit_scale (through exp) and logit_bias."""
    for index, (micro, (cpu_state, cuda_state), image_grad, text_grad) in enumerate(
        zip(micro_batches, cache.rng_states, image_grads, text_grads, strict=True)
    ):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        last = index == len(micro_batches) - 1
        with wrap.gradient_sync(model, enabled=last):
            image_embeds, *outputs = _embed(model, micro, autocast)
            roots, grads = [image_embeds, outputs[0]], [image_grad, text_grad]
            if last:
                for output, stand_in in zip(outputs[1:], stand_ins, strict=True):
                    if stand_in is not None and stand_in.grad is not None and output.requires_grad:
                        roots.append(output)
                        grads.append(stand_in.grad)
            torch.autograd.backward(roots, grads)


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
    cache = _embed_without_graph(model, micro_batches, autocast)
    all_image = torch.cat(cache.image_parts).requires_grad_()
    all_text = torch.cat(cache.text_parts).requires_grad_()
    # Stand-ins for t and b: their gradients are handed to the forward's t and b in the last replay, inside a
    # forward that DDP/FSDP see, so that they are synchronised with the rest. Every stand-in takes a gradient:
    # step 1's t = exp(log_logit_scale) ran under no_grad and cannot say whether the parameter trains; the
    # replay's output can, and only those that need one receive theirs.
    stand_ins = [p.detach().requires_grad_() if p is not None else None for p in (cache.logit_scale, cache.logit_bias)]
    loss = loss_fn(all_image, all_text, *stand_ins)
    scaled(loss).backward()  # step 2: grads of the logit scale/bias stand-ins, and of every embedding
    image_grads = all_image.grad.split([len(p) for p in cache.image_parts])
    text_grads = all_text.grad.split([len(p) for p in cache.text_parts])
    _replay(model, micro_batches, cache, image_grads, text_grads, stand_ins, autocast)
    return loss.detach()
