"""``siglip`` (SigLIP, and SigLIP 2's fixed-resolution models, which are ``SiglipModel`` s with Gemma's tokenizer)
and ``siglip2`` (SigLIP 2's NaFlex models: variable resolution).

Text, both: converted into the built-in text transformer: bidirectional, pooled at the last position, a head with a
bias; every text padded to the full length (``tokenizer.padding: max_length``) and read without a padding mask, as
SigLIP was trained and as transformers computes it from its released tokenizers (their ``model_input_names`` hold
``input_ids`` only, so its processor hands no ``attention_mask`` to the model). Both have a logit bias
(``loss.kind: siglip``) and no image projection (the image embedding is the attention-pooling head's output).

Image: ``siglip`` converts into the built-in ViT (no class token, no ``ln_pre``, a patch bias, attention pooling:
``pool: map``). ``siglip2`` is hosted (``model.image.kind: naflex``, :mod:`clipforge.model.hosted_hf`): each image
keeps its aspect ratio on a patch grid of its own shape, with a padding mask in every layer, which the built-in
ViT (square images of one size) cannot express.
"""

from __future__ import annotations

import math
from typing import Any

from clipforge.config import CheckpointError, ModelConfig
from clipforge.interop.hf_types.base import ExportInputs, HFModelType, ImportContext
from clipforge.interop.hf_types.common import (
    check_rgb,
    hf_tower_fields,
    hf_vit_config,
    hosted_tensor_names,
    text_transformer_rules,
    tower_fields,
    vit_rules,
)
from clipforge.interop.keymaps import Rule, copy_rules
from clipforge.model.hosted_hf import NaFlexVisionTower, naflex_vision_config


def _text_section(hf_config: Any, embed_dim: int, where: str) -> dict[str, Any]:
    text = hf_config.text_config
    projection = getattr(text, "projection_size", None) or text.hidden_size
    if projection != embed_dim:
        raise CheckpointError(
            f"{where}: text_config.projection_size={projection} differs from the image embedding's {embed_dim} "
            "(vision_config.hidden_size): the two cannot be compared"
        )
    return {
        "kind": "transformer",
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        **tower_fields(text, where, "text_config"),
        "causal": False,
        "pooling": "last",
        "head_bias": True,
    }


def _check_head(vision: Any, where: str) -> None:
    if not getattr(vision, "vision_use_head", True):
        raise CheckpointError(
            f"{where}: vision_config.vision_use_head=false: SigLIP's image embedding is its attention-pooling head, "
            "which this model does not have"
        )


def _siglip_section(hf_config: Any, context: ImportContext) -> dict[str, Any]:
    vision, where = hf_config.vision_config, context.where
    check_rgb(vision, where)
    _check_head(vision, where)
    image = {
        "kind": "vit",
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        **tower_fields(vision, where, "vision_config"),
        "pre_norm": False,
        "pool": "map",
        "patch_bias": True,
        "head": "identity",
    }
    text = _text_section(hf_config, vision.hidden_size, where)
    return {"model": {"embed_dim": vision.hidden_size, "image": image, "text": text}, "loss": {"kind": "siglip"}}


def _siglip2_section(hf_config: Any, context: ImportContext) -> dict[str, Any]:
    vision, where = hf_config.vision_config, context.where
    check_rgb(vision, where)
    _check_head(vision, where)
    grid = math.isqrt(vision.num_patches)
    if grid * grid != vision.num_patches:
        raise CheckpointError(
            f"{where}: vision_config.num_patches={vision.num_patches} is not a square: the position table is a "
            "square grid resized to each image's"
        )
    image = {
        "kind": "naflex",
        "image_size": grid * vision.patch_size,
        "patch_size": vision.patch_size,
        **tower_fields(vision, where, "vision_config"),
        "head": "identity",
    }
    text = _text_section(hf_config, vision.hidden_size, where)
    return {"model": {"embed_dim": vision.hidden_size, "image": image, "text": text}, "loss": {"kind": "siglip"}}


def _text_and_logit_rules(model: ModelConfig) -> list[Rule]:
    rules = text_transformer_rules(model.text)
    rules += copy_rules("text_head.proj", "text_model.head")
    return rules + [
        Rule("log_logit_scale", ("logit_scale",), "vector1"),
        Rule("logit_bias", ("logit_bias",), "vector1"),
    ]


def siglip_rules(model: ModelConfig, text_config_json: str | None = None) -> list[Rule]:
    """The map of a ``SiglipModel`` onto the built-in towers."""
    return vit_rules(model.image) + _text_and_logit_rules(model)


def siglip2_rules(model: ModelConfig, text_config_json: str | None = None) -> list[Rule]:
    """The map of a ``Siglip2Model``: the hosted ``Siglip2VisionModel`` tensor by tensor under its own names, the
    text side onto the built-in text transformer."""
    config = naflex_vision_config(model.image)
    names = [name.removeprefix("model.") for name in hosted_tensor_names(lambda: NaFlexVisionTower(config))]
    return copy_rules("image_tower.model", "vision_model", names) + _text_and_logit_rules(model)


def _text_export_config(inputs: ExportInputs) -> dict[str, Any]:
    model, tokenizer = inputs.model, inputs.tokenizer
    text = {**hf_tower_fields(model.text), "vocab_size": inputs.vocab_rows, "projection_size": model.embed_dim}
    text.update(max_position_embeddings=model.text.context_length, pad_token_id=tokenizer.pad_token_id)
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=inputs.eos_token_id)
    return text


def siglip_export_config(inputs: ExportInputs) -> dict[str, Any]:
    """``SiglipConfig`` keyword arguments (the scale and bias come with the weights)."""
    vision = {**hf_vit_config(inputs.model.image), "vision_use_head": True}
    return {"text_config": _text_export_config(inputs), "vision_config": vision}


def siglip2_export_config(inputs: ExportInputs) -> dict[str, Any]:
    """``Siglip2Config`` keyword arguments: the hosted tower's own vision config."""
    vision = naflex_vision_config(inputs.model.image).to_dict()
    return {"text_config": _text_export_config(inputs), "vision_config": vision}


SIGLIP = HFModelType(
    model_type="siglip",
    model_class="SiglipModel",
    config_class="SiglipConfig",
    model_section=_siglip_section,
    rules=siglip_rules,
    export_config=siglip_export_config,
    text_padding="max_length",
    text_inputs=("input_ids",),
)
SIGLIP2 = HFModelType(
    model_type="siglip2",
    model_class="Siglip2Model",
    config_class="Siglip2Config",
    model_section=_siglip2_section,
    rules=siglip2_rules,
    export_config=siglip2_export_config,
    text_padding="max_length",
    text_inputs=("input_ids",),
)
