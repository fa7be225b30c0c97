"""The model as the training step sees it: checkpointed, compiled, and wrapped for several processes.

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`, gradients averaged over ranks in buckets
  during the backward pass.
* ``fsdp``: FSDP2 ``fully_shard`` on every block a tower names as a sharding unit (the built-in towers'
  transformer blocks, :meth:`~clipforge.model.towers.Tower.sharding_units`), then on each tower (what is left
  of it: patch and token embeddings, final norms; a timm/Hugging Face/torchvision tower is one unit), then on
  the model (the heads). The logit scale and bias are 0-dim, which FSDP2 cannot shard: they stay replicated, out of
  FSDP's hands, and :func:`finish_gradients` averages their gradients as DDP would.

Both average gradients over ranks; the trainer backpropagates ``world_size * loss`` to undo that (see
``clipforge.distributed``). Checkpoints hold full, unsharded weights gathered to rank 0 (for FSDP through
``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``), so they load on any world size and in
one process with ``load_checkpoint``. FSDP checkpoints key the optimizer state by parameter name; DDP and
single-process ones use ``optimizer.state_dict()``'s numbering; :func:`load_optimizer_state` reads both.

RNG: :func:`seed_step` reseeds torch's generators at every step from ``(seed, rank, step)``, so each rank
draws its own dropout noise and a resumed run (on any number of processes) redraws exactly the noise an
uninterrupted run with that many processes draws, with no RNG state to gather or restore.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clipforge.config import ConfigError, TrainConfig
from clipforge.distributed.groups import DistributedContext
from clipforge.model import CLIPModel
from clipforge.model.grad_checkpointing import enable_grad_checkpointing

logger = logging.getLogger("clipforge")

__all__ = [
    "compile_towers",
    "evaluation_view",
    "finish_gradients",
    "gradient_sync",
    "is_sharded",
    "load_optimizer_state",
    "model_state",
    "optimizer_state",
    "prepare_model",
    "seed_step",
    "unwrap",
]


def _fsdp() -> Any:
    from torch.distributed import fsdp  # imported on use: FSDP2 loads a good part of torch.distributed

    return fsdp


def compile_towers(model: CLIPModel, **options: Any) -> None:
    """``torch.compile`` each tower in place (``nn.Module.compile``: parameter names, hence checkpoints, stay)."""
    model.image_tower.compile(**options)
    model.text_tower.compile(**options)


def _logit_parameters(model: CLIPModel) -> list[nn.Parameter]:
    return [p for p in (model.log_logit_scale, model.logit_bias) if p is not None]


def shard_model(model: CLIPModel) -> CLIPModel:
    """FSDP2 sharding in place: blocks, then towers, then the model (module docstring). Returns ``model``."""
    fully_shard = _fsdp().fully_shard
    for tower in (model.image_tower, model.text_tower):
        if not any(True for _ in tower.parameters()):
            continue
        if any(parameter.requires_grad for parameter in tower.parameters()):  # a frozen tower is one unit
            for block in tower.sharding_units():
                fully_shard(block)
        fully_shard(tower)
    fully_shard(model, ignored_params=set(_logit_parameters(model)))
    return model


def prepare_model(model: CLIPModel, config: TrainConfig, context: DistributedContext) -> nn.Module:
    """``model`` (on ``context.device``) ready for training: text length buckets, gradient checkpointing and
    compilation as ``config`` asks, then wrapped for ``config.distributed.strategy`` when several processes run.

    Returns the module to call in the training step: the model itself, a DDP wrapper, or the model sharded
    in place (FSDP2). :func:`unwrap` gives the :class:`CLIPModel` back.
    """
    if config.text_buckets > 1:
        _check_text_buckets(model, config, sharded=context.enabled and config.distributed.strategy == "fsdp")
        model.text_buckets = config.text_buckets
    if config.gradient_checkpointing:
        for tower in enable_grad_checkpointing(model):
            logger.warning("train.gradient_checkpointing: the %s has no checkpointing support; it runs without", tower)
    if config.compile:
        compile_towers(model)
    if not context.enabled:
        return model
    if config.distributed.strategy == "fsdp":
        return shard_model(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _check_text_buckets(model: CLIPModel, config: TrainConfig, sharded: bool) -> None:
    """ConfigError where ``train.text_buckets`` would change what the model computes, or is not supported."""
    tower = model.text_tower
    if not getattr(tower, "ignores_padding", False):
        raise ConfigError(
            f"train.text_buckets={config.text_buckets}: the text tower ({tower.describe()}) reads padding positions "
            "(bidirectional built-in layout, 'last' pooling, or a hosted tower), so cutting a batch's padding would "
            "change its features; set train.text_buckets=1"
        )
    if sharded:
        raise ConfigError(
            f"train.text_buckets={config.text_buckets} runs the text tower several times per step, which FSDP2's "
            "sharded tower does not support here; set train.text_buckets=1 or train.distributed.strategy=ddp"
        )


def unwrap(module: nn.Module) -> CLIPModel:
    """The :class:`CLIPModel` inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def is_sharded(module: nn.Module) -> bool:
    """``module`` is an FSDP2-sharded model."""
    return dist.is_available() and isinstance(module, _fsdp().FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, forward + backward of ``module`` all-reduce/reduce-scatter gradients only if ``enabled``.

    GradCache replays its micro-batches with ``enabled=False`` except the last: gradients accumulate locally
    and cross the network once per optimizer step (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``).
    """
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def finish_gradients(module: nn.Module) -> None:
    """After the backward pass: average the replicated logit scale/bias gradients over ranks under FSDP2.

    (DDP already averaged them with the rest; FSDP2 leaves parameters it does not shard alone.)
    """
    if not is_sharded(module):
        return
    grads = [p.grad for p in _logit_parameters(unwrap(module)) if p.grad is not None]
    if grads:
        flat = torch.stack([g.reshape(()) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for grad, value in zip(grads, (flat / dist.get_world_size()).unbind(), strict=True):
            grad.copy_(value)


@contextlib.contextmanager
def evaluation_view(module: nn.Module) -> Iterator[CLIPModel]:
    """The :class:`CLIPModel` to evaluate; under FSDP2 the model-level parameters (heads) are gathered for it
    (towers and blocks gather their own on call), so every rank must enter this together."""
    model = unwrap(module)
    if not is_sharded(module):
        yield model
        return
    module.unshard()
    try:
        yield model
    finally:
        module.reshard()


# ----------------------------------------------------------------------------------------------
# Checkpoint state
# ----------------------------------------------------------------------------------------------
def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights of the model, named as in :class:`CLIPModel`. Under FSDP2 this is a
    collective (every rank calls it) and only rank 0 receives the weights (the others get ``{}``)."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=_full_options())
    return unwrap(module).state_dict()


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state to checkpoint: ``optimizer.state_dict()``, or under FSDP2 the full state keyed by
    parameter name (a collective; rank 0 receives it)."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=_full_options())
    return optimizer.state_dict()


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in ``optimizer.state_dict()``'s numbering (group by group)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def _renumbered(saved: dict[str, Any], old_to_new: dict[Any, Any]) -> dict[str, Any]:
    groups = [{**group, "params": [old_to_new[key] for key in group["params"]]} for group in saved["param_groups"]]
    return {"state": {old_to_new[key]: value for key, value in saved["state"].items()}, "param_groups": groups}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state (either format, see :func:`optimizer_state`) into ``optimizer``.

    Numbers and names are matched through the parameter order of the optimizer's groups, which
    ``build_optimizer`` makes the same for the same model, sharded or not.
    """
    names = _parameter_names(unwrap(module), optimizer)
    saved_keys = [key for group in saved["param_groups"] for key in group["params"]]
    if len(saved_keys) != len(names):
        raise ValueError(
            f"the checkpoint's optimizer holds {len(saved_keys)} parameters, this model's {len(names)}: "
            "resume with the run's own config"
        )
    by_name = all(isinstance(key, str) for key in saved_keys)
    if not is_sharded(module):
        optimizer.load_state_dict(_renumbered(saved, {name: i for i, name in enumerate(names)}) if by_name else saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:
        saved = _renumbered(saved, dict(zip(saved_keys, names, strict=True)))
    set_optimizer_state_dict(module, optimizer, saved, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------
def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's CPU and CUDA generators for optimizer step ``step`` on ``rank`` (module docstring)."""
    mixed = int(np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint64)[0]) & ((1 << 63) - 1)
    # not torch.manual_seed: it also queues a seed for every lazy accelerator backend, formatting a stack trace
    # each time (see benchmarks/README.md); a process trains on the CPU or on its one current GPU
    torch.default_generator.manual_seed(mixed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(mixed)
