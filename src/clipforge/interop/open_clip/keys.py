"""The key map between an open_clip state dict and the clipforge model an import builds, both ways.

open_clip's layouts: ``CLIP`` keeps the text tower's tensors at the top level (``token_embedding.weight``,
``transformer.resblocks.N...``, OpenAI's layout), ``CustomTextCLIP`` and ``CoCa`` under ``text.``; the image tower is
``visual.`` in all three, and ``logit_scale`` (log t) / ``logit_bias`` sit at the top.

* A converted tower maps tensor by tensor (:mod:`clipforge.interop.keymaps`' joins): each block's fused
  ``in_proj_weight`` is already the built-in block's ``qkv`` layout, and a projection used as ``x @ P``
  (``visual.proj``, ``text_projection``) becomes the head's Linear weight ``P^T``.
* A hosted tower (``clipforge.model.hosted_open_clip``) keeps open_clip's names under a prefix:
  ``visual.X`` <-> ``image_tower.visual.X``, ``text.X`` <-> ``text_tower.text.X``: the module is open_clip's own,
  built from the same config, so its tensors are the state dict's under the prefix (the model built for the weights
  then checks every shape and that none is missing).
"""

from __future__ import annotations

import torch

from clipforge.config import ModelConfig
from clipforge.interop.keymaps import Rule, copy_rules, open_clip_block_rules

IMAGE_PREFIX, TEXT_PREFIX = "image_tower.visual.", "text_tower.text."
# buffers some open_clip state dicts hold that are no weights: a causal mask, a text model's position ids
IGNORED_SUFFIXES = (".attn_mask", "attn_mask", "embeddings.position_ids")


def vit_rules(model: ModelConfig) -> list[Rule]:
    """open_clip's plain ViT (``visual.``) -> the built-in ViT and its linear head."""
    rules = [
        Rule("image_tower.patch_embed.weight", ("visual.conv1.weight",)),
        Rule("image_tower.class_embedding", ("visual.class_embedding",)),
        Rule("image_tower.positional_embedding", ("visual.positional_embedding",)),
    ]
    if model.image.pre_norm:
        rules += copy_rules("image_tower.ln_pre", "visual.ln_pre")
    for layer in range(model.image.depth):
        rules += open_clip_block_rules(
            f"image_tower.transformer.blocks.{layer}", f"visual.transformer.resblocks.{layer}"
        )
    rules += copy_rules("image_tower.ln_post", "visual.ln_post")
    rules.append(Rule("image_head.proj.weight", ("visual.proj",), "transpose"))
    return rules


def text_transformer_rules(model: ModelConfig, prefix: str) -> list[Rule]:
    """open_clip's text transformer (under ``prefix``: ``""`` or ``"text."``) -> the built-in one and its head."""
    text = model.text
    rules = [
        Rule("text_tower.token_embedding.weight", (f"{prefix}token_embedding.weight",)),
        Rule("text_tower.positional_embedding", (f"{prefix}positional_embedding",)),
    ]
    for layer in range(text.depth):
        rules += open_clip_block_rules(
            f"text_tower.transformer.blocks.{layer}", f"{prefix}transformer.resblocks.{layer}"
        )
    rules += copy_rules("text_tower.ln_final", f"{prefix}ln_final")
    if text.head == "linear" and text.head_bias:  # proj_bias: an nn.Linear
        rules += copy_rules("text_head.proj", f"{prefix}text_projection")
    elif text.head == "linear":  # a (width, embed_dim) matrix used as x @ P
        rules.append(Rule("text_head.proj.weight", (f"{prefix}text_projection",), "transpose"))
    return rules


def hosted_rules(target_prefix: str, source_prefix: str, keys: list[str]) -> list[Rule]:
    """One copy rule per tensor of a hosted module: ``target_prefix + key`` <- ``source_prefix + key``."""
    return [Rule(target_prefix + key, (source_prefix + key,)) for key in keys]


def open_clip_rules(
    model: ModelConfig,
    text_prefix: str,
    logit_bias: bool,
    image_keys: list[str] | None = None,
    text_keys: list[str] | None = None,
) -> list[Rule]:
    """The whole map of an open_clip model onto the clipforge model ``model`` describes.

    ``text_prefix``: where the text tower sits in the open_clip layout (``""`` for ``CLIP``, ``"text."``); a hosted
    text tower is always under ``text.``. ``image_keys`` / ``text_keys``: the hosted modules' state-dict keys (for
    towers of kind ``open_clip``).
    """
    if model.image.kind == "open_clip":
        rules = hosted_rules(IMAGE_PREFIX, "visual.", image_keys or [])
    else:
        rules = vit_rules(model)
    if model.text.kind == "open_clip":
        rules += hosted_rules(TEXT_PREFIX, "text.", text_keys or [])
    else:
        rules += text_transformer_rules(model, text_prefix)
    rules.append(Rule("log_logit_scale", ("logit_scale",), "scalar"))  # both hold log t
    if logit_bias:
        rules.append(Rule("logit_bias", ("logit_bias",), "scalar"))
    return rules


def hosted_keys(state: dict[str, torch.Tensor], prefix: str, ignored: list[str] = ()) -> list[str]:
    """The keys of ``state`` under ``prefix``, without it (a hosted module's tensors; ``ignored`` left out)."""
    return [key[len(prefix) :] for key in state if key.startswith(prefix) and key not in ignored]


def ignored_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` that hold buffers and no weights (:data:`IGNORED_SUFFIXES`)."""
    return [key for key in state if key.endswith(IGNORED_SUFFIXES)]
