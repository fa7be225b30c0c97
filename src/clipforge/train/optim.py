"""AdamW with decay only on matrix weights, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipforge.config import OptimConfig, ScheduleConfig

# Weight decay shrinks the weights of linear maps and convolutions only. Biases, normalization
# gains, embeddings (token, position, class token) and the logit scale/bias are left alone: decaying
# them pulls scales and offsets towards zero with nothing to gain (as in CLIP and open_clip).
_DECAYED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split once into a decayed group and a not-decayed group."""
    decayed: set[int] = set()
    for module in model.modules():
        if isinstance(module, _DECAYED_MODULES) and module.weight.requires_grad:
            decayed.add(id(module.weight))
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue  # frozen towers never reach the optimizer
        (decay if id(parameter) in decayed else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; the fused kernel on CUDA, the foreach one elsewhere."""
    groups = parameter_groups(model, config.weight_decay)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **fast)


def lr_multiplier(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. Then cosine:
    ``m + (1 - m) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of post-warmup steps done and
    ``m = min_lr_ratio``. ``constant`` keeps 1 after warmup.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, config))
