"""LoRA adapters on the towers' blocks, through the ``peft`` library (``pip install 'clipforge[lora]'``).

A tower with ``lora.rank`` r > 0 gets, on each linear map of its blocks whose role the config targets, the low-rank
update of Hu et al. (2021):

    y = W x + b + (alpha / r) * B A dropout(x),   A: (r, in) Kaiming-uniform, B: (out, r) zeros

so training starts from the tower as it is. ``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` in
place by a ``peft`` LoRA layer (its own weights then live at ``<name>.base_layer.*`` and the adapters at
``<name>.lora_A.default.weight`` / ``lora_B``) and freezes everything else in the tower.

Which linear maps: a tower names them (:meth:`clipforge.model.towers.Tower.adapter_targets`); the default,
:func:`role_targets`, reads the module names inside the tower's numbered blocks (the blocks of
:func:`clipforge.model.locking.layer_ids`) by role (:data:`ROLE_WORDS`), which covers the built-in towers, timm's
vision transformers and Hugging Face encoders (BERT, DistilBERT, RoBERTa, CLIP's text model ...).

:func:`merge_adapters` folds the adapters into the weights, ``W <- W + (alpha / r) B A`` (peft's own merge), and puts
the plain ``nn.Linear`` back: what every model load does (``clipforge.interop.load``), so evaluation, embedding and
every export see a plain model with the original parameter names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from clipforge.config import ConfigError, ModelConfig
from clipforge.model.locking import layer_ids, locked_submodules
from clipforge.packaged import MissingPackageError

if TYPE_CHECKING:
    from clipforge.model.clip import CLIPModel

ADAPTER_NAME = "default"  # peft's name for a model's one adapter; it appears in the parameter names
# a parameter name with one of these belongs to an adapter (peft's LoRA layers)
ADAPTER_KEY_PARTS = (".lora_A.", ".lora_B.")
BASE_LAYER = ".base_layer."
# a module path component containing one of these words gives the module its role (checked in this order: BERT's
# attention output sits at attention.output.dense, its feed-forward output at output.dense)
ROLE_WORDS: dict[str, tuple[str, ...]] = {
    "attention": ("attn", "attention"),
    "mlp": ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "densereludense", "output"),
}
TOWERS = (("image_tower", "image"), ("text_tower", "text"))


def _peft():
    try:
        import peft
    except ImportError:
        raise MissingPackageError(
            "LoRA adapters (model.*.lora.rank > 0) need the peft library: pip install 'clipforge[lora]'"
        ) from None
    return peft


def role_of(module_name: str) -> str | None:
    """The role (``attention`` or ``mlp``) the path ``module_name`` gives a linear map, or None."""
    parts = module_name.lower().split(".")
    for role, words in ROLE_WORDS.items():
        if any(word in part for part in parts for word in words):
            return role
    return None


def role_targets(tower: nn.Module, roles: Sequence[str]) -> list[str]:
    """The names (within ``tower``) of the ``nn.Linear`` maps inside its numbered blocks whose role is in ``roles``."""
    ids, blocks = layer_ids(tower)
    targets = []
    for name, module in tower.named_modules():
        if not isinstance(module, nn.Linear) or not 1 <= ids.get(f"{name}.weight", 0) <= blocks:
            continue
        if role_of(name) in roles:
            targets.append(name)
    return targets


def add_adapters(model: CLIPModel, config: ModelConfig) -> None:
    """Give each tower whose ``lora`` is enabled its adapters (module docstring), in place; the towers' own weights
    are frozen and kept in eval mode like any locked part (``CLIPModel.locked_modules``)."""
    changed = False
    for attribute, side in TOWERS:
        lora = getattr(config, side).lora
        if not lora.enabled:
            continue
        tower = getattr(model, attribute)
        targets = tower.adapter_targets(lora.targets)
        if not targets:
            raise ConfigError(
                f"model.{side}.lora.targets={list(lora.targets)}: the {side} tower ({tower.describe()}) has no linear "
                "layer of these roles inside its blocks; LoRA adapts transformer blocks (ViT, timm vision "
                "transformers, Hugging Face encoders): set a role it has, or lora.rank=0"
            )
        peft = _peft()
        adapter_config = peft.LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
        )
        peft.inject_adapter_in_model(adapter_config, tower, adapter_name=ADAPTER_NAME)
        # peft leaves its config on the module; the clipforge config is the record (and a plain module pickles)
        tower.__dict__.pop("peft_config", None)
        changed = True
    if changed:
        model.locked_modules = tuple(
            locked_submodules(model.image_tower, "image_tower") + locked_submodules(model.text_tower, "text_tower")
        )
        model.train(model.training)


def has_adapters(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a peft adapter layer."""
    return any(_is_adapter_layer(module) for module in model.modules())


def _is_adapter_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


@torch.no_grad()
def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its layer's weight (``W <- W + (alpha / r) B A``, peft's ``merge``) and put the
    plain layer back in its place; returns how many layers were merged. The result computes the same function up
    to float rounding and has the parameter names of a model that never had adapters."""
    layers = [(name, module) for name, module in model.named_modules() if _is_adapter_layer(module)]
    for name, layer in layers:
        layer.merge()
        model.set_submodule(name, layer.get_base_layer())
    return len(layers)


def is_adapter_key(key: str) -> bool:
    """Whether the state-dict key ``key`` holds an adapter's weight."""
    return any(part in key for part in ADAPTER_KEY_PARTS)


def holds_adapters(weights: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict comes from a model with adapters (its adapters, and its layers' ``base_layer`` names)."""
    return any(is_adapter_key(key) or BASE_LAYER in key for key in weights)


def adapted_towers(config: ModelConfig) -> list[str]:
    """``model.image`` / ``model.text``: the towers ``config`` gives adapters."""
    return [f"model.{side}" for _, side in TOWERS if getattr(config, side).lora.enabled]
