"""Import open_clip checkpoints of ViT models (and OpenAI's released state dicts, which share their names).

Spec ``open_clip:CONFIG.json:WEIGHTS``: CONFIG is an open_clip model config (``model_configs/ViT-B-32.json``, or a
hub repository's ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``), WEIGHTS the state dict
(``.safetensors``, or a torch file read with ``weights_only=True``; a training checkpoint's ``state_dict`` and a
DDP ``module.`` prefix are unwrapped). OpenAI's TorchScript archives (the JIT ``ViT-B-32.pt``) are refused: reading
them means running their code. OpenAI's weights were trained with QuickGELU: use the ``-quickgelu`` config.

Only what clipforge's built-in towers express imports: a ViT image tower with a class token (``pool_type: tok``)
and the causal (or, ``no_causal_mask``, bidirectional) text transformer, pooled by ``argmax``, ``eos``, ``first``
or ``last``, with a linear text projection (``proj_bias`` or not) or none; ``quick_gelu``, ``no_ln_pre``,
``norm_kwargs.eps`` and ``init_logit_bias`` (a SigLIP-loss model) are kept. timm towers (ConvNeXt, open_clip's
SigLIP ViTs), ModifiedResNets, Hugging Face text towers, CoCa and layer scale are refused, naming the field.
The tokenizer is CLIP's BPE (:mod:`clipforge.interop.clip_bpe`), or ``text_cfg.hf_tokenizer_name``'s.

Preprocessing is open_clip's ``image_transform`` exactly: ``preprocess_cfg`` (else the ``vision_cfg`` keys older
configs carry) gives mean/std, interpolation and ``resize_mode`` (``shortest``: short side to the image size, then
torchvision's CenterCrop, offsets rounded half to even; ``squash``: the whole image to a square), all resized by
PIL as open_clip's torchvision transforms do on PIL images. ``resize_mode: longest`` (a letterbox padded with
``fill_color``) has no counterpart: it is logged and read as ``shortest``. A model config without a
``preprocess_cfg`` says nothing of the pretrained tag's own (open_clip keeps those in its code: DFN5B's ``squash``,
for one): use the hub repository's ``open_clip_config.json``, which holds it.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from clipforge.config import CheckpointError, Config, ConfigError, config_from_dict
from clipforge.data.tokenize import Tokenizer, load_hf_tokenizer
from clipforge.interop.clip_bpe import clip_bpe_tokenizer
from clipforge.interop.keymaps import convert, open_clip_rules
from clipforge.interop.resolved import Resolved
from clipforge.model.factory import make_processor
from clipforge.model.vision import CLIP_MEAN, CLIP_STD

logger = logging.getLogger("clipforge")

SPEC_PREFIX = "open_clip:"
CLIP_BPE_VOCAB_SIZE = 49408
POOLINGS = {"argmax": "argmax", "eos": "eos", "first": "cls", "last": "last"}  # open_clip -> clipforge
# keys of the model config and what they must be (when present) for the built-in towers to express it
TOP_LEVEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                  "nonscalar_logit_scale", "custom_text", "cast_dtype"}  # fmt: skip
SHARED_DEFAULTS = {"ls_init_value": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                   "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                   "act_kwargs": None}  # fmt: skip
VISION_DEFAULTS = {**SHARED_DEFAULTS, "timm_model_name": None, "attentional_pool": False, "pos_embed_type": "learnable",
                   "pool_type": "tok"}  # fmt: skip
TEXT_DEFAULTS = {**SHARED_DEFAULTS, "hf_model_name": None, "embed_cls": False, "tokenizer_mode": None,
                 "tokenizer_kwargs": None}  # fmt: skip
# read below, or without effect on the weights and the forward pass (patch dropout only acts in open_clip's training)
VISION_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "no_ln_pre", "norm_kwargs",
               "final_ln_after_pool", "output_tokens", "patch_dropout", "attn_pooler_queries", "attn_pooler_heads",
               "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
               "image_mean", "image_std", "interpolation", "resize_mode"}  # fmt: skip
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "eos_id",
             "no_causal_mask", "final_ln_after_pool", "pool_type", "proj_bias", "proj_type", "output_tokens",
             "norm_kwargs", "hf_tokenizer_name", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}  # fmt: skip
NO_COUNTERPART = {
    "vision_cfg.timm_model_name": "a timm image tower (ConvNeXt, EVA, open_clip's SigLIP ViTs ...)",
    "vision_cfg.attentional_pool": "attentional pooling (CoCa)",
    "text_cfg.hf_model_name": "a Hugging Face text tower (XLM-R, mT5 ...)",
    "text_cfg.embed_cls": "a text class token (CoCa)",
}
# OpenAI's state dicts carry these as tensors; they are sizes, checked against the config, not weights
SIZE_KEYS = {"input_resolution": ("vision_cfg", "image_size"), "context_length": ("text_cfg", "context_length"),
             "vocab_size": ("text_cfg", "vocab_size")}  # fmt: skip


def parse_spec(spec: str) -> tuple[Path, Path]:
    """``open_clip:CONFIG.json:WEIGHTS`` -> the two paths (split at the first ``.json:``)."""
    rest = spec.removeprefix(SPEC_PREFIX)
    config, separator, weights = rest.partition(".json:")
    if not separator or not config or not weights:
        raise CheckpointError(
            f"{spec!r}: an open_clip spec names the model config and the weights, open_clip:CONFIG.json:WEIGHTS "
            "(e.g. open_clip:ViT-B-32-quickgelu.json:ViT-B-32.pt)"
        )
    return Path(config + ".json").expanduser(), Path(weights).expanduser()


# ----------------------------------------------------------------------------------------------
# The model config
# ----------------------------------------------------------------------------------------------
def read_model_config(path: Path, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` of an open_clip model config or ``open_clip_config.json``."""
    if not path.is_file():
        raise CheckpointError(f"{where}: no config file {str(path)!r} (open_clip's model_configs/<name>.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where}: {path} is not valid JSON ({error})") from error
    if isinstance(raw, dict) and "model_cfg" in raw:  # a hub repository's open_clip_config.json
        return raw["model_cfg"], raw.get("preprocess_cfg") or {}
    if not isinstance(raw, dict) or "vision_cfg" not in raw or "text_cfg" not in raw:
        raise CheckpointError(f"{where}: {path} is not an open_clip model config (no vision_cfg and text_cfg)")
    return raw, {}


_SUPPORTED = (
    "clipforge imports open_clip ViT models: a ViT image tower with a class token and the built-in text "
    "transformer (convert others to ONNX with open_clip, or train them with model.image.kind=timm)"
)


def _check_supported(model_cfg: dict[str, Any], where: str) -> None:
    """Refuse, naming the field, what the built-in towers cannot express."""
    if "multimodal_cfg" in model_cfg:
        raise CheckpointError(f"{where}: a CoCa model (multimodal_cfg) has no clipforge counterpart; {_SUPPORTED}")
    unknown = sorted(set(model_cfg) - TOP_LEVEL_KEYS)
    if unknown:
        raise CheckpointError(f"{where}: unknown open_clip config keys {unknown}; {_SUPPORTED}")
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if isinstance(vision.get("layers"), list | tuple):
        raise CheckpointError(
            f"{where}: vision_cfg.layers={vision['layers']} is a ModifiedResNet image tower; {_SUPPORTED}"
        )
    for section, values, defaults, known in (
        ("vision_cfg", vision, VISION_DEFAULTS, VISION_KEYS),
        ("text_cfg", text, TEXT_DEFAULTS, TEXT_KEYS),
    ):
        for key, value in values.items():
            if key in defaults and value not in (defaults[key], "default", {}):
                what = NO_COUNTERPART.get(f"{section}.{key}")
                found = f"is {what}" if what else "has no clipforge counterpart"
                raise CheckpointError(f"{where}: {section}.{key}={value!r} {found}; {_SUPPORTED}")
            if key not in defaults and key not in known:
                raise CheckpointError(f"{where}: unknown open_clip {section} key {key!r}; {_SUPPORTED}")
        norm = values.get("norm_kwargs") or {}
        if set(norm) - {"eps"}:
            raise CheckpointError(f"{where}: {section}.norm_kwargs={norm} sets more than eps; {_SUPPORTED}")
    if text.get("proj_type", "linear") not in ("linear", "none"):
        raise CheckpointError(f"{where}: text_cfg.proj_type={text['proj_type']!r} has no counterpart; {_SUPPORTED}")
    if text.get("pool_type", "argmax") not in POOLINGS:
        raise CheckpointError(f"{where}: text_cfg.pool_type={text['pool_type']!r} has no counterpart; {_SUPPORTED}")


def _square(size: Any, where: str, field: str) -> int:
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise CheckpointError(f"{where}: {field}={size}: clipforge's ViT takes square images only")
        return int(size[0])
    return int(size)


def _image_fields(vision: dict[str, Any], act: str, preprocess: dict[str, Any], where: str) -> dict[str, Any]:
    width = vision.get("width", 768)
    mlp_width = int(width * vision.get("mlp_ratio", 4.0))  # open_clip floors; clipforge rounds width * ratio
    interpolation = preprocess.get("interpolation", vision.get("interpolation", "bicubic"))
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        logger.warning(
            "%s: interpolation=%r has no clipforge counterpart; images are resized bicubic", where, interpolation
        )
        interpolation = "bicubic"
    resize_mode = preprocess.get("resize_mode", vision.get("resize_mode")) or "shortest"
    if resize_mode not in ("shortest", "squash"):
        logger.warning(
            "%s: open_clip's resize_mode=%r (the long side to the image size, padded to a square) has no clipforge "
            "counterpart; images are resized as 'shortest' (short side, then a center crop), which differs",
            where,
            resize_mode,
        )
        resize_mode = "shortest"
    return {
        "kind": "vit",
        "image_size": _square(vision.get("image_size", 224), where, "vision_cfg.image_size"),
        "patch_size": _square(vision.get("patch_size", 16), where, "vision_cfg.patch_size"),
        "width": width,
        "depth": vision.get("layers", 12),
        "heads": width // vision.get("head_width", 64),
        "mlp_ratio": mlp_width / width,
        "act": act,
        "norm_eps": (vision.get("norm_kwargs") or {}).get("eps", 1e-5),
        "pre_norm": not vision.get("no_ln_pre", False),
        "mean": list(preprocess.get("mean", vision.get("image_mean", CLIP_MEAN))),
        "std": list(preprocess.get("std", vision.get("image_std", CLIP_STD))),
        "interpolation": interpolation,
        # open_clip's transforms: torchvision's Resize / CenterCrop on PIL images
        "resize_mode": resize_mode,
        "crop_rounding": "round",
        "resize_backend": "pil",
    }


def _text_fields(text: dict[str, Any], act: str, tokenizer_name: str) -> dict[str, Any]:
    width = text.get("width", 512)
    causal = not text.get("no_causal_mask", False)
    pooling = POOLINGS[text.get("pool_type", "argmax")]
    fields = {
        "kind": "transformer",
        "context_length": text.get("context_length", 77),
        "vocab_size": text.get("vocab_size", CLIP_BPE_VOCAB_SIZE),
        "width": width,
        "depth": text.get("layers", 12),
        "heads": text.get("heads", 8),
        "mlp_ratio": int(width * text.get("mlp_ratio", 4.0)) / width,
        "act": act,
        "norm_eps": (text.get("norm_kwargs") or {}).get("eps", 1e-5),
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
    """The clipforge config of an open_clip ViT model config (checked by :func:`_check_supported` first)."""
    _check_supported(model_cfg, where)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    embed_dim = model_cfg["embed_dim"]
    text_cfg = model_cfg["text_cfg"]
    tokenizer_name = text_cfg.get("hf_tokenizer_name") or "clip-bpe"
    values = {
        "model": {
            "embed_dim": embed_dim,
            "image": _image_fields(model_cfg["vision_cfg"], act, preprocess, where),
            "text": _text_fields(text_cfg, act, tokenizer_name),
        },
        "loss": {"kind": "clip" if model_cfg.get("init_logit_bias") is None else "siglip"},
    }
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise CheckpointError(f"{where}: the model does not fit a clipforge config: {error}") from error


# ----------------------------------------------------------------------------------------------
# Weights and tokenizer
# ----------------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a ``code/`` folder (its Python code) and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def read_weights(path: Path, where: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (module docstring); TorchScript refused, nothing in the file is run."""
    if not path.is_file():
        raise CheckpointError(f"{where}: no weights file {str(path)!r}")
    if _is_torchscript(path):
        raise CheckpointError(
            f"{where}: {path.name} is a TorchScript archive (OpenAI's JIT release), and reading it means running "
            "its code; convert it with open_clip first: model = open_clip.create_model('ViT-B-32-quickgelu', "
            f"pretrained='{path}'); torch.save(model.state_dict(), 'ViT-B-32-state.pt')"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a broken or foreign file means the same thing to the user
        raise CheckpointError(f"{where}: {path.name} could not be read as a state dict ({error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an open_clip training checkpoint
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{where}: {path.name} is not a state dict (parameter name -> tensor)")
    if state and all(key.startswith("module.") for key in state):  # saved from a DDP wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _drop_size_keys(state: dict[str, torch.Tensor], model_cfg: dict[str, Any], where: str) -> None:
    """Remove OpenAI's size tensors from ``state``, in place, after checking them against the config."""
    for key, (section, field) in SIZE_KEYS.items():
        if key not in state:
            continue
        value = int(state.pop(key).item())
        expected = _square(model_cfg[section].get(field, value), where, f"{section}.{field}")
        if value != expected:
            raise CheckpointError(
                f"{where}: the weights were saved from a model with {key}={value}, but {section}.{field}={expected}"
            )


def open_clip_tokenizer(config: Config, text_cfg: dict[str, Any], where: str) -> Tokenizer:
    """CLIP's BPE, or the Hugging Face tokenizer ``hf_tokenizer_name`` names."""
    padding = config.model.text.tokenizer.padding
    if text_cfg.get("hf_tokenizer_name"):
        return load_hf_tokenizer(text_cfg["hf_tokenizer_name"], f"{where} text_cfg.hf_tokenizer_name", padding)
    if config.model.text.vocab_size != CLIP_BPE_VOCAB_SIZE:
        raise CheckpointError(
            f"{where}: text_cfg.vocab_size={config.model.text.vocab_size} without an hf_tokenizer_name, but "
            f"open_clip's own tokenizer is CLIP's {CLIP_BPE_VOCAB_SIZE}-token BPE"
        )
    return clip_bpe_tokenizer(padding)


def import_open_clip(config_path: Path, weights_path: Path) -> Resolved:
    """An open_clip ViT model (config + state dict) as a clipforge config, weights (clipforge's names) and
    processor (its tokenizer and preprocessing)."""
    where = f"{SPEC_PREFIX}{config_path}:{weights_path}"
    model_cfg, preprocess = read_model_config(config_path, where)
    config = open_clip_model_config(model_cfg, preprocess, where)
    state = read_weights(weights_path, where)
    _drop_size_keys(state, model_cfg, where)
    text_prefix = "text." if any(key.startswith("text.") for key in state) else ""  # CustomTextCLIP
    ignored = [key for key in state if key.rsplit(".", 1)[-1] == "attn_mask"]  # a causal mask buffer
    rules = open_clip_rules(config.model, text_prefix, logit_bias=config.loss.kind == "siglip")
    converted = convert(state, rules, ignored, where)
    tokenizer = open_clip_tokenizer(config, model_cfg["text_cfg"], where)
    return Resolved(config, converted, make_processor(config.model, tokenizer), where)
