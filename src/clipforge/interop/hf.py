"""Import a Hugging Face ``CLIPModel`` or ``SiglipModel`` (a local folder, or a hub id where the network allows).

:func:`import_hf` reads the folder as ``save_pretrained`` wrote it, without building the transformers model:

* ``config.json`` -> the clipforge model config (:func:`hf_model_config`): built-in ViT and text transformer with
  the released layout's explicit fields: CLIP = class token, ``ln_pre``, causal text, bias-free projections,
  text pooled at the first ``eos_token_id`` (or at ``argmax(input_ids)`` when the config says
  ``eos_token_id == 2``, as transformers does for old CLIP configs); SigLIP = no class token, attention pooling
  (``pool: map``), patch bias, bidirectional text pooled at the last position, a text head with a bias and no
  image projection, ``loss.kind: siglip`` (it has a logit bias);
* ``preprocessor_config.json`` -> ``model.image.image_size`` / ``mean`` / ``std`` / ``interpolation``;
* the tokenizer files -> the checkpoint's tokenizer (CLIP's BPE, SigLIP's SentencePiece, through transformers);
  SigLIP pads every text to the full length (``tokenizer.padding: max_length``);
* the weights (``model.safetensors``, sharded or not, or ``pytorch_model.bin`` read with ``weights_only``) ->
  clipforge's names through the explicit map :func:`clipforge.interop.keymaps.hf_rules`, strictly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint import CheckpointError, LoadedCheckpoint
from clipforge.config import Config, ConfigError, config_from_dict
from clipforge.data.tokenize import (
    TOKENIZER_FILES,
    HFTokenizer,
    load_hf_tokenizer,
    looks_like_path,
    quiet_transformers,
)
from clipforge.interop.keymaps import convert, hf_rules, load_converted
from clipforge.model.vision import CLIP_MEAN, CLIP_STD

logger = logging.getLogger("clipforge")

SUPPORTED_MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# Hugging Face hidden_act -> clipforge act (the inverse is what an export writes)
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# PIL's resampling filters as image processors store them -> clipforge's interpolation names
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
CLIP_LEGACY_EOS_ID = 2  # transformers pools CLIP text at argmax(input_ids) when the config says eos_token_id == 2
# buffers older transformers saved with the weights; they are no weights (arange(n))
IGNORED_SUFFIXES = ("position_ids",)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ----------------------------------------------------------------------------------------------
# Finding the folder and reading its config
# ----------------------------------------------------------------------------------------------
def resolve_folder(location: str) -> Path:
    """The local folder of ``location``: itself, or the hub snapshot of a hub id (downloaded where allowed)."""
    folder = Path(location).expanduser()
    if folder.is_dir():
        return folder
    if looks_like_path(location) or not location:
        raise CheckpointError(f"hf:{location}: no such folder (a folder written by save_pretrained, or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(location, allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"]))
        if not any(snapshot.glob("*.safetensors")):  # an older repository: PyTorch pickles only
            snapshot = Path(snapshot_download(location, allow_patterns=["*.bin"]))
    except Exception as error:  # noqa: BLE001 - offline, unknown repository, gated: the same advice
        raise CheckpointError(
            f"hf:{location} is neither a local folder nor a Hugging Face hub id that is cached here or can be "
            f"downloaded ({type(error).__name__}); offline, point hf: at a folder written by save_pretrained"
        ) from error
    return snapshot


def read_hf_config(folder: Path, where: str) -> tuple[str, Any]:
    """``(model_type, transformers config)`` of ``folder``; only CLIP and SigLIP models are accepted."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{where}: {folder} has no config.json, so it is no saved model; point hf: at a folder written by "
            f"save_pretrained of a {' or '.join(SUPPORTED_MODEL_TYPES.values())}"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where}: {path} is not valid JSON ({error})") from error
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        architectures = raw.get("architectures") if isinstance(raw, dict) else None
        supported = ", ".join(f"{name} (model_type {key!r})" for key, name in SUPPORTED_MODEL_TYPES.items())
        raise CheckpointError(
            f"{where} holds a model of model_type {model_type!r} (architectures {architectures}); "
            f"clipforge imports {supported}"
        )
    from transformers import CLIPConfig, SiglipConfig

    config_class = CLIPConfig if model_type == "clip" else SiglipConfig
    with quiet_transformers():
        return model_type, config_class.from_dict(raw)


# ----------------------------------------------------------------------------------------------
# config.json + preprocessor_config.json -> clipforge config
# ----------------------------------------------------------------------------------------------
def _act(hidden_act: Any, where: str, tower: str) -> str:
    if hidden_act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: {tower}.hidden_act={hidden_act!r} has no clipforge counterpart; "
            f"supported: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[hidden_act]


def _tower_fields(tower_config: Any, where: str, tower: str) -> dict[str, Any]:
    """The fields both built-in towers share, from a Hugging Face vision or text config."""
    return {
        "width": tower_config.hidden_size,
        "depth": tower_config.num_hidden_layers,
        "heads": tower_config.num_attention_heads,
        "mlp_ratio": tower_config.intermediate_size / tower_config.hidden_size,
        "act": _act(tower_config.hidden_act, where, tower),
        "norm_eps": float(tower_config.layer_norm_eps),
    }


def read_preprocess(folder: Path, model_type: str, image_size: int, where: str) -> dict[str, Any]:
    """``mean`` / ``std`` / ``interpolation`` of ``preprocessor_config.json`` (the family's own without one).

    clipforge resizes the short side to ``image_size`` and center-crops; a processor that does otherwise (a
    larger resize before the crop; SigLIP's resize of the whole image to a square) is logged: for square images
    the two agree.
    """
    mean, std = (CLIP_MEAN, CLIP_STD) if model_type == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    path = folder / "preprocessor_config.json"
    raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    resample = raw.get("resample", 3)
    interpolation = PIL_RESAMPLE.get(resample)
    if interpolation is None:
        logger.warning("%s: resample=%s has no clipforge counterpart; images are resized bicubic", where, resample)
        interpolation = "bicubic"
    size = raw.get("size") or {}
    if isinstance(size, dict) and ("height" in size or "width" in size) and model_type == "siglip":
        logger.warning(
            "%s: SigLIP's processor resizes the whole image to %s x %s; clipforge resizes the short side and "
            "center-crops (the same for square images)",
            where,
            size.get("height"),
            size.get("width"),
        )
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    if shortest is not None and shortest != image_size:
        logger.warning(
            "%s: the processor resizes the short side to %s before its %s px crop; clipforge resizes it to %s",
            where,
            shortest,
            image_size,
            image_size,
        )
    return {
        "mean": [float(v) for v in raw.get("image_mean", mean)],
        "std": [float(v) for v in raw.get("image_std", std)],
        "interpolation": interpolation,
    }


def hf_model_config(
    model_type: str, hf_config: Any, preprocess: dict[str, Any], tokenizer_name: str, where: str
) -> Config:
    """The clipforge config of a Hugging Face CLIP (``model_type="clip"``) or SigLIP model config."""
    vision, text = hf_config.vision_config, hf_config.text_config
    if getattr(vision, "num_channels", 3) != 3:
        raise CheckpointError(f"{where}: vision_config.num_channels={vision.num_channels}; clipforge reads RGB")
    image = {
        "kind": "vit",
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        **_tower_fields(vision, where, "vision_config"),
        **preprocess,
    }
    text_fields = {
        "kind": "transformer",
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        **_tower_fields(text, where, "text_config"),
        "tokenizer": {"kind": "hf", "name": tokenizer_name},
    }
    if model_type == "clip":
        embed_dim, loss = hf_config.projection_dim, "clip"
        eos = text.eos_token_id
        pooling = {"pooling": "argmax"} if eos == CLIP_LEGACY_EOS_ID else {"pooling": "eos", "eos_token_id": eos}
        text_fields.update(pooling)
    else:
        if not getattr(vision, "vision_use_head", True):
            raise CheckpointError(
                f"{where}: vision_config.vision_use_head=false: SigLIP's image embedding is its attention-pooling "
                "head, which this model does not have"
            )
        embed_dim, loss = vision.hidden_size, "siglip"
        projection = getattr(text, "projection_size", None) or text.hidden_size
        if projection != embed_dim:
            raise CheckpointError(
                f"{where}: text_config.projection_size={projection} differs from the image embedding's "
                f"{embed_dim} (vision_config.hidden_size): the two cannot be compared"
            )
        image.update(pre_norm=False, pool="map", patch_bias=True, head="identity")
        text_fields.update(causal=False, pooling="last", head_bias=True)
        text_fields["tokenizer"]["padding"] = "max_length"
    values = {"model": {"embed_dim": embed_dim, "image": image, "text": text_fields}, "loss": {"kind": loss}}
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise CheckpointError(f"{where}: the model does not fit a clipforge config: {error}") from error


# ----------------------------------------------------------------------------------------------
# Weights and tokenizer
# ----------------------------------------------------------------------------------------------
def _read_weight_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as error:  # noqa: BLE001 - a broken or foreign file means the same thing to the user
        raise CheckpointError(f"{where}: {path.name} could not be read as weights ({error})") from error


def read_hf_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """The state dict saved in ``folder``: one file, or the shards an ``*.index.json`` lists."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path, where)
        shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_weight_file(folder / shard, where))
        return state
    raise CheckpointError(
        f"{where}: {folder} has a config.json but no PyTorch weights ({' or '.join(WEIGHT_FILES[::2])}); "
        "save the model with save_pretrained"
    )


def read_hf_tokenizer(folder: Path, padding: str, where: str) -> HFTokenizer:
    """The tokenizer saved beside the model, through transformers' ``AutoTokenizer``."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{where}: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); save it beside the model "
            "(tokenizer.save_pretrained(folder))"
        )
    try:
        return load_hf_tokenizer(str(folder), where, padding)
    except (ConfigError, ImportError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{where}: its tokenizer does not load ({str(error).strip().splitlines()[0]}); SigLIP's SentencePiece "
            "tokenizer needs pip install sentencepiece"
        ) from error


def import_hf(location: str) -> LoadedCheckpoint:
    """A Hugging Face CLIP or SigLIP model (folder or hub id) as a clipforge model, tokenizer and config."""
    where = f"hf:{location}"
    folder = resolve_folder(location)
    model_type, hf_config = read_hf_config(folder, where)
    preprocess = read_preprocess(folder, model_type, hf_config.vision_config.image_size, where)
    config = hf_model_config(model_type, hf_config, preprocess, location, where)
    tokenizer = read_hf_tokenizer(folder, config.model.text.tokenizer.padding, where)
    state = read_hf_weights(folder, where)
    ignored = [key for key in state if key.endswith(IGNORED_SUFFIXES)]
    converted = convert(state, hf_rules(config.model, model_type), ignored, where)
    model = load_converted(config, tokenizer, converted, where)
    return LoadedCheckpoint(model, tokenizer, config, 0)
