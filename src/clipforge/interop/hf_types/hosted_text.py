"""``chinese_clip`` (Chinese-CLIP: a BERT text encoder) and ``altclip`` (AltCLIP: an XLM-R encoder, then a LayerNorm
and a linear map of every token): the CLIP ViT converted into the built-in ViT, the text encoder hosted.

The built-in text transformer is a pre-LN causal CLIP transformer; BERT and XLM-R are post-LN encoders with token
type and (for XLM-R) padding-offset position embeddings, so their text models run as transformers' own modules in
clipforge's Hugging Face text tower (``model.text.kind: hf``, :class:`clipforge.model.text.HFTextEncoder`):
``ChineseCLIPTextModel`` / ``AltCLIPTextModel`` built from the folder's ``text_config``, which the checkpoint keeps
(its ``hf_text_config``), pooled at the first token (``[CLS]`` / ``<s>``), padding masked as transformers masks it.
Their projections (``text_projection``, ``visual_projection``) become clipforge's linear heads, and the logit scale
its ``log_logit_scale`` (``loss.kind: clip``).
"""

from __future__ import annotations

import json
from typing import Any

from clipforge.config import ModelConfig
from clipforge.interop.hf_types.base import ExportInputs, HFModelType, ImportContext
from clipforge.interop.hf_types.common import hf_vit_config, hosted_tensor_names, vit_rules, vit_section
from clipforge.interop.keymaps import Rule, copy_rules
from clipforge.model.text import HFTextEncoder

# a declared model_max_length this large means "no limit" (transformers' VERY_LARGE_INTEGER)
UNBOUNDED_LENGTH = 10**6


def context_length(text_config: Any, declared_max_length: int | None) -> int:
    """The longest text the hosted text tower reads: its position table (XLM-R's positions start after its padding
    id, so it holds ``pad_token_id + 1`` fewer), and no longer than the tokenizer declares (``model_max_length``)."""
    positions = int(text_config.max_position_embeddings)
    if text_config.model_type == "altclip_text_model":  # RoBERTa's positions: padding_idx + 1 onwards
        positions -= int(text_config.pad_token_id) + 1
    if declared_max_length is not None and declared_max_length < UNBOUNDED_LENGTH:
        return min(positions, int(declared_max_length))
    return positions


def _section(hf_config: Any, context: ImportContext) -> dict[str, Any]:
    text = {
        "kind": "hf",
        "name": context.location,
        "pretrained": None,  # the import's weights fill it
        "pooling": "cls",
        "context_length": context_length(hf_config.text_config, context.declared_max_length),
    }
    image = vit_section(hf_config.vision_config, context.where)
    return {"model": {"embed_dim": hf_config.projection_dim, "image": image, "text": text}, "loss": {"kind": "clip"}}


def hosted_text_rules(model: ModelConfig, text_config_json: str | None) -> list[Rule]:
    """The map of a ``ChineseCLIPModel`` / ``AltCLIPModel``: the ViT onto the built-in one, the text model tensor by
    tensor under its own names (from its config, ``text_config_json``)."""
    if text_config_json is None:
        raise ValueError("a hosted text tower's key map needs its Hugging Face config")
    rules = vit_rules(model.image)
    if model.image.head == "linear":
        rules.append(Rule("image_head.proj.weight", ("visual_projection.weight",)))
    names = hosted_tensor_names(lambda: HFTextEncoder(model.text.name, None, "cls", None, text_config_json))
    rules += copy_rules("text_tower.encoder", "text_model", [name.removeprefix("encoder.") for name in names])
    rules.append(Rule("text_head.proj.weight", ("text_projection.weight",)))
    return rules + [Rule("log_logit_scale", ("logit_scale",), "scalar")]


def hosted_text_export_config(inputs: ExportInputs) -> dict[str, Any]:
    """``ChineseCLIPConfig`` / ``AltCLIPConfig`` keyword arguments: the hosted text model's own config, the ViT's,
    the projection size and log t."""
    return {
        "text_config": json.loads(inputs.text_config_json),
        "vision_config": hf_vit_config(inputs.model.image),
        "projection_dim": inputs.model.embed_dim,
        "logit_scale_init_value": inputs.log_logit_scale,
    }


CHINESE_CLIP = HFModelType(
    model_type="chinese_clip",
    model_class="ChineseCLIPModel",
    config_class="ChineseCLIPConfig",
    model_section=_section,
    rules=hosted_text_rules,
    export_config=hosted_text_export_config,
    hosted_text=True,
)
ALTCLIP = HFModelType(
    model_type="altclip",
    model_class="AltCLIPModel",
    config_class="AltCLIPConfig",
    model_section=_section,
    rules=hosted_text_rules,
    export_config=hosted_text_export_config,
    hosted_text=True,
    file_renames=((r"layer\.", "layers."),),  # released AltCLIP files name their layers encoder.layer.N
)
