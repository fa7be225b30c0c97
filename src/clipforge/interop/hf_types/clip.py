"""``clip`` (OpenAI CLIP, LAION CLIP in Hugging Face's format) and ``metaclip_2`` (MetaCLIP 2, multilingual, XLM-R's
tokenizer): converted into clipforge's built-in ViT and text transformer, which express both exactly.

Layout: a class-token ViT with ``ln_pre`` (``pre_layrnorm``), a causal text transformer, bias-free projections, a
scalar logit scale and no bias (``loss.kind: clip``). Text pooling: at the first ``eos_token_id`` of a row; CLIP
alone keeps transformers' old-config rule that ``eos_token_id == 2`` means "pool at ``argmax(input_ids)``" (OpenAI's
end-of-text is its largest id), which MetaCLIP 2 does not (its end-of-text, XLM-R's ``</s>``, *is* id 2).
"""

from __future__ import annotations

from typing import Any

from clipforge.config import ModelConfig
from clipforge.interop.hf_types.base import ExportInputs, HFModelType, ImportContext
from clipforge.interop.hf_types.common import (
    hf_tower_fields,
    hf_vit_config,
    text_transformer_rules,
    tower_fields,
    vit_rules,
    vit_section,
)
from clipforge.interop.keymaps import Rule

CLIP_LEGACY_EOS_ID = 2  # transformers pools CLIP text at argmax(input_ids) when the config says eos_token_id == 2


def _section(hf_config: Any, context: ImportContext, legacy_eos_rule: bool) -> dict[str, Any]:
    text = hf_config.text_config
    eos = text.eos_token_id
    if legacy_eos_rule and eos == CLIP_LEGACY_EOS_ID:
        pooling = {"pooling": "argmax"}
    else:
        pooling = {"pooling": "eos", "eos_token_id": eos}
    text_section = {
        "kind": "transformer",
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        **tower_fields(text, context.where, "text_config"),
        **pooling,
    }
    image = vit_section(hf_config.vision_config, context.where)
    return {
        "model": {"embed_dim": hf_config.projection_dim, "image": image, "text": text_section},
        "loss": {"kind": "clip"},
    }


def clip_rules(model: ModelConfig, text_config_json: str | None = None) -> list[Rule]:
    """The map of a ``CLIPModel`` / ``MetaClip2Model`` onto the built-in towers (no hosted part)."""
    rules = vit_rules(model.image)
    if model.image.head == "linear":
        rules.append(Rule("image_head.proj.weight", ("visual_projection.weight",)))
    rules += text_transformer_rules(model.text)
    rules.append(Rule("text_head.proj.weight", ("text_projection.weight",)))
    return rules + [Rule("log_logit_scale", ("logit_scale",), "scalar")]  # both hold log t


def clip_export_config(inputs: ExportInputs) -> dict[str, Any]:
    """``CLIPConfig`` / ``MetaClip2Config`` keyword arguments; ``logit_scale_init_value`` is log t."""
    model, tokenizer = inputs.model, inputs.tokenizer
    text = {**hf_tower_fields(model.text), "vocab_size": inputs.vocab_rows}
    text.update(max_position_embeddings=model.text.context_length, pad_token_id=tokenizer.pad_token_id)
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=inputs.eos_token_id)
    return {
        "text_config": text,
        "vision_config": hf_vit_config(model.image),
        "projection_dim": model.embed_dim,
        "logit_scale_init_value": inputs.log_logit_scale,
    }


CLIP = HFModelType(
    model_type="clip",
    model_class="CLIPModel",
    config_class="CLIPConfig",
    model_section=lambda hf_config, context: _section(hf_config, context, legacy_eos_rule=True),
    rules=clip_rules,
    export_config=clip_export_config,
    text_inputs=("input_ids", "attention_mask"),
)
METACLIP_2 = HFModelType(
    model_type="metaclip_2",
    model_class="MetaClip2Model",
    config_class="MetaClip2Config",
    model_section=lambda hf_config, context: _section(hf_config, context, legacy_eos_rule=False),
    rules=clip_rules,
    export_config=clip_export_config,
    text_inputs=("input_ids", "attention_mask"),
)
