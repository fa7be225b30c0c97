"""An exponential moving average (EMA) of the weights a run trains, kept beside them (``train.ema``).

After optimizer step ``s`` (counted from 1), with ``d = train.ema.decay``:

    s <= start_step:                         ema = theta_s                      (the average has not started)
    s >  start_step, (s - start_step) % every == 0:
                                             ema = d * ema + (1 - d) * theta_s  (torch.lerp: ema + (1 - d)(theta - ema))

The rule reads nothing but the step and the weights, so a run resumed from a checkpoint (which holds the average)
continues it bit for bit. The average covers the parameters that train (``requires_grad``): locked towers and the
frozen weights under LoRA never change, and buffers (BatchNorm statistics) are the raw model's; a checkpoint's
``ema`` therefore names those parameters only, and ``--weights ema`` lays them over the raw weights
(``clipforge.interop.load``).

Several processes: under DDP every rank keeps the same average of the same replicated parameters; under FSDP2 each
average is a clone of its sharded parameter (a ``DTensor`` with the parameter's mesh and placements), so every rank
holds and updates only its shard. Checkpoints gather it whole (a collective, like the weights), and a resumed run
shards it again, on any number of processes.
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import CheckpointError, EMAConfig


def _is_distributed_tensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: its shard for a DTensor (the same storage), else itself."""
    return tensor.to_local() if _is_distributed_tensor(tensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: a DTensor gathered from every rank (a collective), else itself."""
    return tensor.full_tensor() if _is_distributed_tensor(tensor) else tensor


class WeightAverage:
    """The moving average of ``model``'s trainable parameters (module docstring); ``model`` is the
    :class:`~clipforge.model.CLIPModel` (sharded in place under FSDP2), not a DDP wrapper."""

    def __init__(self, model: nn.Module, config: EMAConfig) -> None:
        self.config = config
        trained = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        self.names = [name for name, _ in trained]
        self.parameters = [parameter for _, parameter in trained]
        with torch.no_grad():
            self.averages = [parameter.detach().clone() for parameter in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1-based) into the average, as the schedule says."""
        start, every = self.config.start_step, self.config.every
        averages = [_local(average) for average in self.averages]
        weights = [_local(parameter.detach()) for parameter in self.parameters]
        if step <= start:
            torch._foreach_copy_(averages, weights)
        elif (step - start) % every == 0:
            torch._foreach_lerp_(averages, weights, 1.0 - self.config.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole average by parameter name, on the CPU; under FSDP2 a collective (every rank calls it)."""
        return {
            name: _full(average).detach().cpu().clone() for name, average in zip(self.names, self.averages, strict=True)
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take a checkpoint's average (full tensors); under FSDP2 each rank keeps its shard of it."""
        missing = [name for name in self.names if name not in state]
        if missing or len(state) != len(self.names):
            raise CheckpointError(
                f"the checkpoint's weight average covers {len(state)} parameters, this run trains {len(self.names)} "
                f"(first missing: {missing[:1]}); resume with the run's own config (the same towers locked)"
            )
        for name, average in zip(self.names, self.averages, strict=True):
            full = state[name].to(device=average.device, dtype=average.dtype)
            if full.shape != average.shape:
                raise CheckpointError(
                    f"the checkpoint's weight average of {name} has shape {tuple(full.shape)}, the model's "
                    f"{tuple(average.shape)}; resume with the run's own config"
                )
            if _is_distributed_tensor(average):
                from torch.distributed.tensor import distribute_tensor

                # every rank read the same checkpoint: each cuts its own shard, nothing crosses the network
                full = distribute_tensor(full, average.device_mesh, average.placements, src_data_rank=None).to_local()
            _local(average).copy_(full)
