"""An open_clip model config -> the clipforge config of the same model: each tower converted into a built-in tower
where one expresses it, else hosted as open_clip's own module (``clipforge.model.hosted_open_clip``).

Converted (the built-in towers' speed features kept: fused attention, the one-token last block, CPU kernels,
attention maps for explanations):

* the image tower when it is open_clip's plain ViT: a class token (``pool_type: tok``), learned positions, the
  default block (no layer scale, no custom attention), GELU / QuickGELU / tanh-GELU, only LayerNorm's ``eps`` set;
  ``no_ln_pre`` and ``final_ln_after_pool`` are kept (the latter changes nothing when one token is pooled);
* the text tower when it is open_clip's text transformer without a class token (``embed_cls``) or layer scale:
  causal or not (``no_causal_mask``), pooled by ``argmax``, ``eos``, ``first`` or ``last``, a linear projection
  (``proj_bias`` or not) or none.

Hosted, everything else: timm towers (``timm_model_name``: the trunk's architecture lives in timm's registry, and
open_clip adds its pooling and projection head), ModifiedResNets (``layers`` a list), CoCa's attentional-pool ViT and
class-token text transformer, Hugging Face text towers (``hf_model_name``), layer scale, average pooling, patch
dropout (training behaviour the built-in ViT has not) and custom attention blocks. CoCa's caption decoder
(``multimodal_cfg``) is left out: its contrastive towers are what clipforge trains and uses.

Preprocessing is open_clip's ``image_transform`` exactly: ``preprocess_cfg`` (else the ``vision_cfg`` keys older
configs carry, else open_clip's defaults: OpenAI's mean/std, bicubic, ``shortest``) gives mean/std, interpolation and
``resize_mode`` (``shortest``: short side to the image size, then torchvision's CenterCrop, offsets rounded half to
even; ``squash``: the whole image to a square), resized by PIL as open_clip's torchvision transforms do on PIL
images. ``resize_mode: longest`` (a letterbox padded with ``fill_color``) has no counterpart: it is logged and read
as ``shortest``. A model config without a ``preprocess_cfg`` says nothing of a pretrained tag's own (open_clip keeps
those in its code: SigLIP's ``squash`` and mean/std 0.5, for one): import the hub repository (``hf-hub:`` or
``local-dir:``), whose ``open_clip_config.json`` holds it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from clipforge.config import CheckpointError, Config, ConfigError, config_from_dict
from clipforge.model.vision import CLIP_MEAN, CLIP_STD

logger = logging.getLogger("clipforge")

CLIP_BPE_VOCAB_SIZE = 49408
POOLINGS = {"argmax": "argmax", "eos": "eos", "first": "cls", "last": "last"}  # open_clip -> clipforge
TOP_LEVEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                  "nonscalar_logit_scale", "custom_text", "cast_dtype", "multimodal_cfg"}  # fmt: skip
# block options the built-in towers have not (any of them set: the tower is hosted)
CUSTOM_BLOCK = {"ls_init_value": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}  # fmt: skip
# the vision_cfg keys open_clip's preprocessing reads in configs older than preprocess_cfg
LEGACY_PREPROCESS = {"mean": "image_mean", "std": "image_std", "interpolation": "interpolation",
                     "resize_mode": "resize_mode"}  # fmt: skip
# the activations the built-in towers have, by open_clip's act_kwargs
TANH_GELU = {"approximate": "tanh"}
# the keys of open_clip's CLIPVisionCfg / CLIPTextCfg (3.x); another key is refused, naming it
VISION_KEYS = {*CUSTOM_BLOCK, "act_kwargs", "attentional_pool", "attn_pooler_heads", "attn_pooler_queries",
               "final_ln_after_pool", "head_width", "image_size", "layers", "mlp_ratio", "no_ln_pre", "norm_kwargs",
               "output_tokens", "patch_dropout", "patch_size", "pool_type", "pos_embed_type", "timm_drop",
               "timm_drop_path", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
               "width", *LEGACY_PREPROCESS.values()}  # fmt: skip
TEXT_KEYS = {*CUSTOM_BLOCK, "act_kwargs", "context_length", "embed_cls", "eos_id", "final_ln_after_pool", "heads",
             "hf_model_name", "hf_model_pretrained", "hf_pooler_type", "hf_proj_type", "hf_tokenizer_name", "layers",
             "mlp_ratio", "no_causal_mask", "norm_kwargs", "output_tokens", "pad_id", "pool_type", "proj_bias",
             "proj_type", "tokenizer_kwargs", "tokenizer_mode", "vocab_size", "width"}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Which towers convert
# ----------------------------------------------------------------------------------------------
def _custom_block(section: dict[str, Any]) -> str | None:
    for key, default in CUSTOM_BLOCK.items():
        if section.get(key, default) not in (default, "default"):
            return f"{key}={section[key]!r}"
    norm = section.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        return f"norm_kwargs={norm}"
    act = section.get("act_kwargs")
    if act not in (None, {}, TANH_GELU):
        return f"act_kwargs={act}"
    return None


def vision_host_reason(vision: dict[str, Any]) -> str | None:
    """Why the built-in ViT cannot express ``vision_cfg`` (the tower is then hosted); None when it can."""
    if vision.get("timm_model_name"):
        return f"a timm tower ({vision['timm_model_name']})"
    if isinstance(vision.get("layers"), list | tuple):
        return "a ModifiedResNet"
    if vision.get("attentional_pool"):
        return "attentional pooling (CoCa)"
    if vision.get("pool_type", "tok") != "tok":
        return f"pool_type={vision['pool_type']!r}"
    if vision.get("pos_embed_type", "learnable") != "learnable":
        return f"pos_embed_type={vision['pos_embed_type']!r}"
    if vision.get("patch_dropout", 0.0):
        return "patch dropout"
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if len({*_pair(size)}) != 1 or len({*_pair(patch)}) != 1:
        return f"a non-square image_size={size} / patch_size={patch}"
    return _custom_block(vision)


def text_host_reason(text: dict[str, Any]) -> str | None:
    """Why the built-in text transformer cannot express ``text_cfg`` (hosted then); None when it can."""
    if text.get("hf_model_name"):
        return f"a Hugging Face text tower ({text['hf_model_name']})"
    if text.get("embed_cls"):
        return "a text class token (CoCa)"
    if text.get("pool_type", "argmax") not in POOLINGS:
        return f"pool_type={text['pool_type']!r}"
    if text.get("proj_type", "linear") not in ("linear", "none"):
        return f"proj_type={text['proj_type']!r}"
    return _custom_block(text)


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value, value)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------
def image_preprocess_fields(vision: dict[str, Any], preprocess: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``model.image`` preprocessing fields of open_clip's transform (module docstring)."""

    def read(name: str, default: Any) -> Any:
        return preprocess.get(name, vision.get(LEGACY_PREPROCESS[name], default))

    interpolation = read("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        logger.warning(
            "%s: interpolation=%r has no clipforge counterpart; images are resized bicubic", where, interpolation
        )
        interpolation = "bicubic"
    resize_mode = read("resize_mode", None) or "shortest"
    if resize_mode not in ("shortest", "squash"):
        logger.warning(
            "%s: open_clip's resize_mode=%r (the long side to the image size, padded to a square) has no clipforge "
            "counterpart; images are resized as 'shortest' (short side, then a center crop), which differs",
            where,
            resize_mode,
        )
        resize_mode = "shortest"
    size = vision.get("image_size", 224)
    if len({*_pair(size)}) != 1:
        raise CheckpointError(f"{where}: vision_cfg.image_size={size}: clipforge preprocesses square images only")
    return {
        "image_size": int(_pair(size)[0]),
        "mean": [float(v) for v in read("mean", CLIP_MEAN)],
        "std": [float(v) for v in read("std", CLIP_STD)],
        "interpolation": interpolation,
        # open_clip's transforms: torchvision's Resize / CenterCrop on PIL images
        "resize_mode": resize_mode,
        "crop_rounding": "round",
        "resize_backend": "pil",
    }


# ----------------------------------------------------------------------------------------------
# The towers' sections
# ----------------------------------------------------------------------------------------------
def _act(section: dict[str, Any], quick_gelu: bool) -> str:
    if section.get("act_kwargs") == TANH_GELU:
        return "gelu_tanh"
    return "quick_gelu" if quick_gelu else "gelu"


def _eps(section: dict[str, Any]) -> float:
    return float((section.get("norm_kwargs") or {}).get("eps", 1e-5))


def hosted_source(model_cfg: dict[str, Any], section: str) -> str:
    """The JSON a hosted tower is built from: ``embed_dim``, ``quick_gelu`` and its section, without the options
    that only shape what open_clip returns (``output_tokens``) or fetch weights (``*_pretrained``)."""
    # older configs' preprocessing keys are read by the preprocessing, and open_clip 3's config classes refuse them
    dropped = ("output_tokens", *LEGACY_PREPROCESS.values())
    values = {key: value for key, value in model_cfg[section].items() if key not in dropped}
    values.pop("timm_model_pretrained" if section == "vision_cfg" else "hf_model_pretrained", None)
    source = {"embed_dim": model_cfg["embed_dim"], "quick_gelu": bool(model_cfg.get("quick_gelu", False))}
    return json.dumps({**source, section: values}, sort_keys=True)


def image_fields(model_cfg: dict[str, Any], preprocess: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``model.image`` section: the built-in ViT, or open_clip's tower hosted."""
    vision = model_cfg["vision_cfg"]
    fields = image_preprocess_fields(vision, preprocess, where)
    if vision_host_reason(vision) is not None:
        return {"kind": "open_clip", "open_clip": hosted_source(model_cfg, "vision_cfg"), "head": "identity", **fields}
    width = vision.get("width", 768)
    mlp_width = int(width * vision.get("mlp_ratio", 4.0))  # open_clip floors; clipforge rounds width * ratio
    return {
        "kind": "vit",
        "patch_size": int(_pair(vision.get("patch_size", 16))[0]),
        "width": width,
        "depth": vision.get("layers", 12),
        "heads": width // vision.get("head_width", 64),
        "mlp_ratio": mlp_width / width,
        "act": _act(vision, bool(model_cfg.get("quick_gelu", False))),
        "norm_eps": _eps(vision),
        "pre_norm": not vision.get("no_ln_pre", False),
        **fields,
    }


def text_fields(model_cfg: dict[str, Any], tokenizer_name: str) -> dict[str, Any]:
    """The ``model.text`` section: the built-in text transformer, or open_clip's tower hosted. The tokenizer pads
    to the full context where the tower reads its padding (bidirectional attention, CoCa's class token)."""
    text = model_cfg["text_cfg"]
    context_length = text.get("context_length", 77)
    reason = text_host_reason(text)
    if reason is not None:
        # a Hugging Face encoder masks its padding: batches pad to their longest text; CoCa's class token follows
        # the padding, so its texts are padded as it was trained, to the full context
        padding = "longest" if text.get("hf_model_name") else "max_length"
        return {
            "kind": "open_clip",
            "open_clip": hosted_source(model_cfg, "text_cfg"),
            "pretrained": None,
            "context_length": context_length,
            "head": "identity",
            "tokenizer": {"kind": "hf", "name": tokenizer_name, "padding": padding},
        }
    width = text.get("width", 512)
    causal = not text.get("no_causal_mask", False)
    pooling = POOLINGS[text.get("pool_type", "argmax")]
    fields = {
        "kind": "transformer",
        "context_length": context_length,
        "vocab_size": text.get("vocab_size", CLIP_BPE_VOCAB_SIZE),
        "width": width,
        "depth": text.get("layers", 12),
        "heads": text.get("heads", 8),
        "mlp_ratio": int(width * text.get("mlp_ratio", 4.0)) / width,
        "act": _act(text, bool(model_cfg.get("quick_gelu", False))),
        "norm_eps": _eps(text),
        "causal": causal,
        "pooling": pooling,
        "head": "identity" if text.get("proj_type", "linear") == "none" else "linear",
        "head_bias": bool(text.get("proj_bias", False)) and text.get("proj_type", "linear") != "none",
        # open_clip pads every text to context_length; a bidirectional tower reads that padding
        "tokenizer": {"kind": "hf", "name": tokenizer_name, "padding": "longest" if causal else "max_length"},
    }
    if pooling == "eos":
        fields["eos_token_id"] = text.get("eos_id", 2)
    return fields


def open_clip_model_config(model_cfg: dict[str, Any], preprocess: dict[str, Any], where: str) -> Config:
    """The clipforge config of the open_clip model ``model_cfg`` describes (module docstring)."""
    unknown = sorted(set(model_cfg) - TOP_LEVEL_KEYS)
    if unknown:
        raise CheckpointError(
            f"{where}: unknown open_clip config keys {unknown} (open_clip's are {sorted(TOP_LEVEL_KEYS)})"
        )
    for section, known in (("vision_cfg", VISION_KEYS), ("text_cfg", TEXT_KEYS)):
        if not isinstance(model_cfg.get(section), dict):
            raise CheckpointError(f"{where}: an open_clip model config needs a {section} mapping")
        unknown = sorted(set(model_cfg[section]) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown open_clip {section} keys {unknown}")
    if "embed_dim" not in model_cfg:
        raise CheckpointError(f"{where}: an open_clip model config needs embed_dim")
    if "multimodal_cfg" in model_cfg:
        logger.warning(
            "%s: a CoCa model: its contrastive image and text towers are imported; its caption decoder "
            "(multimodal_cfg, text_decoder.*) is not (captioning stays with open_clip)",
            where,
        )
    tokenizer_name = model_cfg["text_cfg"].get("hf_tokenizer_name") or "clip-bpe"
    values = {
        "model": {
            "embed_dim": model_cfg["embed_dim"],
            "image": image_fields(model_cfg, preprocess, where),
            "text": text_fields(model_cfg, tokenizer_name),
        },
        "loss": {"kind": "clip" if model_cfg.get("init_logit_bias") is None else "siglip"},
    }
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise CheckpointError(f"{where}: the model does not fit a clipforge config: {error}") from error
