"""What the Hugging Face model types share: activations and tower sizes (both ways), the key maps of the CLIP and
SigLIP ViTs and text transformers (which clipforge's built-in towers express), and the tensor names of hosted
modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clipforge.config import BUILTIN_VIT_IMAGE_SIZE, CheckpointError, ImageTowerConfig, TextTowerConfig
from clipforge.interop.keymaps import Rule, copy_rules
from clipforge.model.hosted_hf import CLIPFORGE_TO_HF_ACTIVATIONS, HF_ACTIVATIONS


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def clipforge_act(hidden_act: Any, where: str, tower: str) -> str:
    """A Hugging Face ``hidden_act`` as clipforge's ``act``, or a refusal naming the config field."""
    if hidden_act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: {tower}.hidden_act={hidden_act!r} has no clipforge counterpart; supported: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[hidden_act]


def tower_fields(tower_config: Any, where: str, tower: str) -> dict[str, Any]:
    """The fields clipforge's transformer towers share, from a Hugging Face vision or text config."""
    return {
        "width": tower_config.hidden_size,
        "depth": tower_config.num_hidden_layers,
        "heads": tower_config.num_attention_heads,
        "mlp_ratio": tower_config.intermediate_size / tower_config.hidden_size,
        "act": clipforge_act(tower_config.hidden_act, where, tower),
        "norm_eps": float(tower_config.layer_norm_eps),
    }


def hf_tower_fields(tower: ImageTowerConfig | TextTowerConfig) -> dict[str, Any]:
    """:func:`tower_fields` the other way: a clipforge tower's sizes in a Hugging Face config's names."""
    return {
        "hidden_size": tower.width,
        "intermediate_size": int(round(tower.width * tower.mlp_ratio)),
        "num_hidden_layers": tower.depth,
        "num_attention_heads": tower.heads,
        "hidden_act": CLIPFORGE_TO_HF_ACTIVATIONS[tower.act],
        "layer_norm_eps": tower.norm_eps,
    }


def check_rgb(vision: Any, where: str) -> None:
    if getattr(vision, "num_channels", 3) != 3:
        raise CheckpointError(f"{where}: vision_config.num_channels={vision.num_channels}; clipforge reads RGB")


def vit_section(vision: Any, where: str) -> dict[str, Any]:
    """The image section of a CLIP-style ViT (a class token, ``pre_layrnorm``, no patch bias: CLIP, MetaCLIP 2,
    Chinese-CLIP, AltCLIP) as the built-in ViT."""
    check_rgb(vision, where)
    return {
        "kind": "vit",
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        **tower_fields(vision, where, "vision_config"),
    }


def hf_vit_config(image: ImageTowerConfig) -> dict[str, Any]:
    """The vision config of the built-in ViT ``image``, in Hugging Face's names."""
    size = image.image_size or BUILTIN_VIT_IMAGE_SIZE
    return {**hf_tower_fields(image), "image_size": size, "patch_size": image.patch_size, "num_channels": 3}


# ----------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------
def hf_block_rules(target: str, source: str) -> list[Rule]:
    """One pre-LN block: a Hugging Face CLIP / SigLIP encoder layer ``source`` -> clipforge block ``target``."""
    rules = copy_rules(f"{target}.ln1", f"{source}.layer_norm1")
    for name in ("weight", "bias"):
        projections = tuple(f"{source}.self_attn.{part}_proj.{name}" for part in ("q", "k", "v"))
        rules.append(Rule(f"{target}.attn.qkv.{name}", projections, "qkv"))
    rules += copy_rules(f"{target}.attn.out_proj", f"{source}.self_attn.out_proj")
    rules += copy_rules(f"{target}.ln2", f"{source}.layer_norm2")
    rules += copy_rules(f"{target}.mlp.fc1", f"{source}.mlp.fc1")
    rules += copy_rules(f"{target}.mlp.fc2", f"{source}.mlp.fc2")
    return rules


def vit_rules(image: ImageTowerConfig, vision: str = "vision_model") -> list[Rule]:
    """The built-in ViT ``image`` <- a Hugging Face CLIP-style (class token) or SigLIP-style (``pool: map``) vision
    transformer under ``vision``."""
    rules = [Rule("image_tower.patch_embed.weight", (f"{vision}.embeddings.patch_embedding.weight",))]
    if image.patch_bias:
        rules.append(Rule("image_tower.patch_embed.bias", (f"{vision}.embeddings.patch_embedding.bias",)))
    if image.pool == "cls":
        rules.append(Rule("image_tower.class_embedding", (f"{vision}.embeddings.class_embedding",)))
    rules.append(Rule("image_tower.positional_embedding", (f"{vision}.embeddings.position_embedding.weight",)))
    if image.pre_norm:
        rules += copy_rules("image_tower.ln_pre", f"{vision}.pre_layrnorm")  # sic: Hugging Face's spelling
    for layer in range(image.depth):
        rules += hf_block_rules(f"image_tower.transformer.blocks.{layer}", f"{vision}.encoder.layers.{layer}")
    rules += copy_rules("image_tower.ln_post", f"{vision}.post_layernorm")
    if image.pool == "map":
        pool, head = "image_tower.attn_pool", f"{vision}.head"
        rules.append(Rule(f"{pool}.probe", (f"{head}.probe",)))
        rules.append(Rule(f"{pool}.qkv.weight", (f"{head}.attention.in_proj_weight",)))
        rules.append(Rule(f"{pool}.qkv.bias", (f"{head}.attention.in_proj_bias",)))
        rules += copy_rules(f"{pool}.out_proj", f"{head}.attention.out_proj")
        rules += copy_rules(f"{pool}.norm", f"{head}.layernorm")
        rules += copy_rules(f"{pool}.mlp.fc1", f"{head}.mlp.fc1")
        rules += copy_rules(f"{pool}.mlp.fc2", f"{head}.mlp.fc2")
    return rules


def text_transformer_rules(text: TextTowerConfig, source: str = "text_model") -> list[Rule]:
    """The built-in text transformer ``text`` <- a Hugging Face CLIP / SigLIP text transformer under ``source``
    (its projection or head excepted)."""
    rules = [
        Rule("text_tower.token_embedding.weight", (f"{source}.embeddings.token_embedding.weight",)),
        Rule("text_tower.positional_embedding", (f"{source}.embeddings.position_embedding.weight",)),
    ]
    for layer in range(text.depth):
        rules += hf_block_rules(f"text_tower.transformer.blocks.{layer}", f"{source}.encoder.layers.{layer}")
    return rules + copy_rules("text_tower.ln_final", f"{source}.final_layer_norm")


def hosted_tensor_names(build: Callable[[], nn.Module]) -> list[str]:
    """The state-dict names of the module ``build`` makes, built on the ``meta`` device (nothing is allocated): a
    hosted module's map is one rule per tensor it really has."""
    with torch.device("meta"):
        return list(build().state_dict())
