"""Locking towers (LiT) and the per-layer learning-rate scales of fine-tuning.

Both rest on one view of a tower as a stack of layers: id 0 is the stem (everything before the first
block), ids 1..K are its numbered blocks in order, and id K + 1 is what follows the last block (a final norm,
a head convolution). Blocks are found by parameter name: the numbered children of a ``blocks`` / ``layer(s)``
/ ``h`` / ``resblocks`` / ``features`` / ``stages`` container (one level deeper too: timm's
``blocks.<stage>.<block>``), or torchvision ResNets' ``layer<stage>.<block>``; a block is the container's path with
its number(s), so two containers (a convolutional stem's ``stages`` and a ViT's ``blocks`` after it) give
distinct blocks, numbered in the order their parameters come. That covers the built-in towers, timm and torchvision
backbones (a ConvNeXt's stages, downsampling included), Hugging Face encoders (``encoder.layer.<i>``) and
open_clip's hosted towers.

``lock``: ``True`` locks every parameter, ``False`` none, ``"all-but-last-N"`` all but blocks K-N+1..K and
what follows them. Locked parameters get ``requires_grad=False`` (the optimizer never sees them), and every
maximal submodule whose parameters are all locked is kept in eval mode by the model (BatchNorm statistics
and dropout frozen there), whatever ``train()`` says.
"""

from __future__ import annotations

import re

from torch import nn

from clipforge.config import LOCK_PATTERN

_BLOCK_PATTERNS = (
    re.compile(r"(?:^|\.)(?:blocks|layers|layer|h|resblocks|features|stages)\.(\d+)(?:\.(\d+)(?=\.))?"),
    re.compile(r"(?:^|\.)layer(\d+)\.(\d+)(?=\.)"),  # torchvision ResNet: layer1.0.conv1.weight
)


def unlocked_blocks(lock: bool | str) -> int | None:
    """How many final blocks ``lock`` leaves trainable: None = all (no lock), 0 = none (fully locked)."""
    if lock is False:
        return None
    if lock is True:
        return 0
    match = LOCK_PATTERN.fullmatch(str(lock))
    if match is None:
        raise ValueError(f"lock={lock!r} is not a lock; use true, false or 'all-but-last-N'")
    return int(match.group(1))


def _block_key(name: str) -> str | None:
    """The block a parameter belongs to: its name up to the block's number(s) (``trunk.stages.2``), or None."""
    for pattern in _BLOCK_PATTERNS:
        match = pattern.search(name)
        if match is not None:
            return name[: match.end()]
    return None


def layer_ids(tower: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> layer id, K): 0 = stem, 1..K = blocks in order, K + 1 = after the last block.

    Blocks are numbered in the order their first parameters come (registration order: forward order). A parameter
    outside every block is stem when it comes before the first block's parameters, else it follows the blocks. A
    tower without numbered blocks has K = 0, all of it stem.
    """
    keys = {name: _block_key(name) for name, _ in tower.named_parameters()}
    ordinal: dict[str, int] = {}
    for key in keys.values():
        if key is not None and key not in ordinal:
            ordinal[key] = len(ordinal) + 1
    ids, seen_block = {}, False
    for name, key in keys.items():
        if key is not None:
            seen_block = True
            ids[name] = ordinal[key]
        else:
            ids[name] = len(ordinal) + 1 if seen_block else 0
    return ids, len(ordinal)


def lock_tower(tower: nn.Module, lock: bool | str, where: str) -> None:
    """Set ``requires_grad`` on ``tower``'s parameters as ``lock`` says (see the module docstring).

    ``where`` names the config field in errors, e.g. ``model.image.lock``.
    """
    keep = unlocked_blocks(lock)
    if keep is None:
        return
    ids, blocks = layer_ids(tower)
    if keep > blocks:
        raise ValueError(
            f"{where}={lock!r} asks for {keep} trainable blocks but this tower has {blocks} numbered blocks; "
            f"use at most 'all-but-last-{blocks}', or false to train it all"
        )
    first_trainable = blocks - keep + 1 if keep else blocks + 2  # ids >= this train; K + 2 = none do
    for name, parameter in tower.named_parameters():
        parameter.requires_grad_(ids[name] >= first_trainable)


def locked_submodules(module: nn.Module, prefix: str = "") -> list[str]:
    """Names (under ``prefix``) of the maximal submodules of ``module`` that hold parameters, all locked.

    Putting these in eval mode freezes BatchNorm statistics and dropout exactly in the locked parts; a
    submodule with any trainable parameter is descended into instead.
    """
    parameters = list(module.parameters())
    if parameters and not any(p.requires_grad for p in parameters):
        return [prefix]
    names = []
    for child_name, child in module.named_children():
        names.extend(locked_submodules(child, f"{prefix}.{child_name}" if prefix else child_name))
    return names


def layer_lr_scales(tower: nn.Module, lr_scale: float, layer_decay: float) -> dict[str, float]:
    """Parameter name -> learning-rate factor ``lr_scale * layer_decay ** (K + 1 - layer id)``.

    The block nearest the output trains at ``lr_scale * layer_decay``, what follows the blocks at ``lr_scale``,
    the stem at ``lr_scale * layer_decay ** (K + 1)`` (layer-wise lr decay, as in BEiT and ELECTRA).
    """
    ids, blocks = layer_ids(tower)
    return {name: lr_scale * layer_decay ** (blocks + 1 - layer) for name, layer in ids.items()}
