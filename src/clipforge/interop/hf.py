"""Import a Hugging Face ``CLIPModel`` or ``SiglipModel`` (a local folder, or a hub id where the network allows).

:func:`import_hf` reads the folder as ``save_pretrained`` wrote it, without building the transformers model:

* ``config.json`` -> the clipforge model config (:func:`hf_model_config`): built-in ViT and text transformer with
  the released layout's explicit fields: CLIP = class token, ``ln_pre``, causal text, bias-free projections,
  text pooled at the first ``eos_token_id`` (or at ``argmax(input_ids)`` when the config says
  ``eos_token_id == 2``, as transformers does for old CLIP configs); SigLIP = no class token, attention pooling
  (``pool: map``), patch bias, bidirectional text pooled at the last position, a text head with a bias and no
  image projection, ``loss.kind: siglip`` (it has a logit bias);
* ``preprocessor_config.json`` -> ``model.image.mean`` / ``std`` / ``interpolation`` and the resize rule
  (:func:`read_preprocess`): what ``AutoImageProcessor.from_pretrained(folder)`` does by default, exactly;
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

from clipforge.config import CheckpointError, Config, ConfigError, config_from_dict
from clipforge.data.hf_loading import looks_like_path, quiet_transformers
from clipforge.data.tokenize import TOKENIZER_FILES, HFTokenizer, load_hf_tokenizer
from clipforge.interop.keymaps import convert, hf_rules
from clipforge.interop.resolved import Resolved
from clipforge.model.factory import make_processor
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


def _size_dict(value: Any, square: bool) -> dict[str, Any]:
    """An image processor's ``size`` / ``crop_size`` as a dict; older configs store an int (``size`` = the short
    side, as transformers reads it for CLIP and SigLIP; ``crop_size`` = a square)."""
    if isinstance(value, dict):
        return {key: entry for key, entry in value.items() if entry is not None}
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    return {}


def _processor_family(raw: dict[str, Any], model_type: str) -> str:
    """Whose defaults fill what ``raw`` leaves out: its ``image_processor_type``'s, else the model's family."""
    processor = str(raw.get("image_processor_type") or "")
    return "clip" if processor.startswith("CLIP") else "siglip" if processor.startswith("Siglip") else model_type


def _resize_rule(raw: dict[str, Any], family: str, image_size: int, where: str) -> dict[str, Any]:
    """The resize fields of a processor config ``raw`` (see :class:`clipforge.data.transforms.ImagePreprocess`).

    ``size: {height, width}`` without a crop -> ``squash`` (SigLIP's processor); ``size: {shortest_edge}`` with a
    center crop of ``image_size`` -> ``shortest`` with ``resize_size`` = the edge (CLIP's). Both with transformers'
    crop rounding (down) and its default backend, torchvision's tensor resize. What has no exact counterpart
    (``longest_edge``, a non-square or missing crop, a resize that is off) is logged and read as the family's
    own rule at the model's image size.
    """
    family_size = {"height": image_size, "width": image_size} if family == "siglip" else {}
    size = _size_dict(raw.get("size"), square=False) or family_size or {"shortest_edge": image_size}
    do_crop = raw.get("do_center_crop", family == "clip")
    crop = _size_dict(raw.get("crop_size"), square=True) or {"height": image_size, "width": image_size}
    # what transformers does whatever the sizes: crop offsets rounded down, its default backend's tensor resize
    rule = {"crop_rounding": "floor", "resize_backend": "torchvision"}
    square = {"height": image_size, "width": image_size}
    if raw.get("do_resize", True) and set(size) == {"height", "width"}:
        if size == square and (not do_crop or crop == square):
            return {**rule, "resize_mode": "squash"}
    elif raw.get("do_resize", True) and set(size) == {"shortest_edge"}:
        edge = int(size["shortest_edge"])
        if do_crop and crop == square and edge >= image_size:
            return {**rule, "resize_mode": "shortest", "resize_size": edge if edge != image_size else None}
    fallback = "squash" if family == "siglip" else "shortest"
    logger.warning(
        "%s: the image processor's resize (do_resize=%s, size=%s, do_center_crop=%s, crop_size=%s) has no exact "
        "clipforge counterpart for this %s px model; images are resized as %r at %s px, which differs from "
        "transformers' preprocessing on some images",
        where,
        raw.get("do_resize", True),
        size,
        do_crop,
        crop,
        image_size,
        fallback,
        image_size,
    )
    return {**rule, "resize_mode": fallback}


def read_preprocess(folder: Path, model_type: str, image_size: int, where: str) -> dict[str, Any]:
    """``mean`` / ``std`` / ``interpolation`` and the resize rule of ``preprocessor_config.json`` (the family's
    own without one): what ``AutoImageProcessor.from_pretrained(folder)`` does to an image.

    transformers 5 gives the torchvision backend by default (``CLIPImageProcessor`` / ``SiglipImageProcessor``;
    the PIL ones, ``backend="pil"``, differ by one level in a few pixels), which center-crops at
    (resized - crop) // 2: the import reads ``resize_backend: torchvision``, ``crop_rounding: floor``.
    """
    path = folder / "preprocessor_config.json"
    raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    family = _processor_family(raw, model_type)
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    resample = raw.get("resample", 3)
    interpolation = PIL_RESAMPLE.get(resample)
    if interpolation is None:
        logger.warning("%s: resample=%s has no clipforge counterpart; images are resized bicubic", where, resample)
        interpolation = "bicubic"
    return {
        "mean": [float(v) for v in raw.get("image_mean", mean)],
        "std": [float(v) for v in raw.get("image_std", std)],
        "interpolation": interpolation,
        **_resize_rule(raw, family, image_size, where),
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


def import_hf(location: str) -> Resolved:
    """A Hugging Face CLIP or SigLIP model (folder or hub id) as a clipforge config, weights (clipforge's names)
    and processor (its tokenizer and its image processor's rule)."""
    where = f"hf:{location}"
    folder = resolve_folder(location)
    model_type, hf_config = read_hf_config(folder, where)
    preprocess = read_preprocess(folder, model_type, hf_config.vision_config.image_size, where)
    config = hf_model_config(model_type, hf_config, preprocess, location, where)
    tokenizer = read_hf_tokenizer(folder, config.model.text.tokenizer.padding, where)
    state = read_hf_weights(folder, where)
    ignored = [key for key in state if key.endswith(IGNORED_SUFFIXES)]
    converted = convert(state, hf_rules(config.model, model_type), ignored, where)
    return Resolved(config, converted, make_processor(config.model, tokenizer), where)
