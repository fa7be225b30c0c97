"""Export a clipforge checkpoint as a Hugging Face folder of the model type that expresses it, checked at export.

``export_hf(loaded, out_dir)`` writes ``config.json`` + ``model.safetensors`` (``save_pretrained``), the tokenizer
files and ``preprocessor_config.json``, so ``AutoModel.from_pretrained(out_dir)`` and ``AutoProcessor`` /
``AutoTokenizer`` / ``AutoImageProcessor`` load it offline. The type follows the model's layout
(:func:`export_type`):

* the NaFlex tower (``model.image.kind: naflex``) -> ``siglip2`` (``Siglip2Model``);
* a ViT with attention pooling (``pool: map``) and a bidirectional text tower pooled at the last position ->
  ``siglip`` (``SiglipModel``);
* a class-token ViT with ``ln_pre`` and a causal text transformer -> ``clip`` (``CLIPModel``), or ``metaclip_2``
  (``MetaClip2Model``) when it pools at the first end-of-text id 2, which ``CLIPModel`` reads as "pool at
  ``argmax(input_ids)``";
* that ViT with a hosted Chinese-CLIP or AltCLIP text model -> ``chinese_clip`` / ``altclip``.

The weights go through the type's explicit key map (:mod:`clipforge.interop.hf_types`), inverted, so import ->
export is lossless. What no type expresses is refused with the part named: timm / torchvision image towers, other
Hugging Face text towers, MLP heads, a logit bias on CLIP's towers, and the like; ``clipforge export onnx`` exports
any model. Identity heads become identity projections and missing biases zeros (the same outputs).

The tokenizer is the checkpoint's, portable: ``model_max_length`` = the context length, right padding, nothing of
this machine in ``tokenizer_config.json``. SigLIP's text tower reads its padding (every text padded to the full
length) without a padding mask: its exported tokenizer, like Google's, lists ``input_ids`` alone in
``model_input_names``, so transformers' processor hands the model no ``attention_mask`` (which it would mask by).
The image processor follows the checkpoint's rule (:mod:`clipforge.interop.hf_types.preprocess`).

Text pooling of ``clip``: clipforge's BPE puts ``<eos>`` at id 2, so its export renumbers ``<eos>`` to the last id
(the tokenizer and the embedding rows swap it with the token there); another tokenizer whose end-of-text id is 2
exports as ``metaclip_2`` when its pooling says ``eos``, and is refused otherwise.

After writing, the folder is loaded back with transformers and its embeddings and logits compared with clipforge's
on captions of different lengths (through the exported tokenizer, as its pipeline calls the model) and non-square
images (through clipforge's processor); a difference above ``atol`` fails the export and nothing is left in
``out_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.config import CheckpointError, ModelConfig
from clipforge.data.hf_loading import quiet_transformers
from clipforge.data.naflex import unpack
from clipforge.data.tokenize import BpeTokenizer, Tokenizer
from clipforge.folders import LOCK_NAME, staged_folder
from clipforge.interop.hf_types import CLIP_LEGACY_EOS_ID, HF_MODEL_TYPES, ExportInputs, HFModelType
from clipforge.interop.hf_types.preprocess import image_processor, processor_differences
from clipforge.interop.keymaps import invert
from clipforge.io import atomic_write_text
from clipforge.model.factory import LoadedModel
from clipforge.model.text import resolve_pooling

logger = logging.getLogger("clipforge")

CHECK_CAPTIONS = ["a photo", "a small red circle on a white page", "two dogs", "x"]
CHECK_IMAGE_SIZES = ((61, 43), (40, 72), (50, 50))  # (width, height): both orientations and a square
ONNX_HINT = "clipforge export onnx exports any model"
SIGLIP_TYPES = ("siglip", "siglip2")
# hosted text models by their config's model_type -> the Hugging Face type that holds them
HOSTED_TEXT_TYPES = {"chinese_clip_text_model": "chinese_clip", "altclip_text_model": "altclip"}


@dataclass
class HFExport:
    """What :func:`export_hf` wrote: the folder, the model type (``clip``, ``siglip2``, ...) and its transformers
    class, and the largest difference between transformers' and clipforge's embeddings and logits on the check
    batch."""

    folder: Path
    model_type: str
    model_class: str
    max_difference: float


def _refuse(part: str, why: str) -> None:
    raise CheckpointError(f"{part} has no Hugging Face counterpart ({why}); {ONNX_HINT}")


# ----------------------------------------------------------------------------------------------
# Which type expresses the model
# ----------------------------------------------------------------------------------------------
def export_type(model: ModelConfig, has_logit_bias: bool, text_config_json: str | None) -> HFModelType:
    """The Hugging Face model type that expresses ``model`` (module docstring); refuses what none does."""
    image, text = model.image, model.text
    for side, tower in (("image", image), ("text", text)):
        if tower.head == "mlp":
            _refuse(f"the {side} head (model.{side}.head='mlp')", "the Hugging Face types project linearly")
    if image.kind == "naflex":
        _check_siglip_text(model)
        return HF_MODEL_TYPES["siglip2"]
    if image.kind != "vit":
        _refuse(
            f"the image tower (model.image.kind={image.kind!r})",
            "the Hugging Face types have ViT image towers (SigLIP 2's NaFlex ViT among them)",
        )
    if image.pool == "map":
        if image.pre_norm:
            _refuse("model.image.pre_norm=true with attention pooling", "SigLIP's ViT has no ln_pre")
        _check_siglip_text(model)
        return HF_MODEL_TYPES["siglip"]
    _check_clip_towers(model, has_logit_bias)
    if text.kind == "hf":
        model_type = json.loads(text_config_json or "{}").get("model_type")
        if model_type not in HOSTED_TEXT_TYPES:
            _refuse(
                f"the text tower (model.text.kind='hf', {text.name}, model_type {model_type!r})",
                "CLIP's and SigLIP's text towers are their own transformers; of Hugging Face text models only "
                "Chinese-CLIP's and AltCLIP's have a two-tower type",
            )
        if resolve_pooling(text) != "cls":
            _refuse(f"model.text.pooling={text.pooling!r} with {model_type}", "its model pools the first token")
        return HF_MODEL_TYPES[HOSTED_TEXT_TYPES[model_type]]
    if not text.causal:
        _refuse("model.text.causal=false with a class-token ViT", "CLIP's text tower is causal")
    pooling = resolve_pooling(text)
    if pooling not in ("eot", "eos", "argmax"):
        _refuse(f"model.text.pooling={text.pooling!r}", "CLIP pools at the end-of-text token")
    if pooling == "eos" and text.eos_token_id == CLIP_LEGACY_EOS_ID:
        return HF_MODEL_TYPES["metaclip_2"]  # pools at the first id 2, which CLIPModel would read as argmax
    return HF_MODEL_TYPES["clip"]


def _check_clip_towers(model: ModelConfig, has_logit_bias: bool) -> None:
    """The class-token ViT and the heads that CLIP, MetaCLIP 2, Chinese-CLIP and AltCLIP share."""
    image, text = model.image, model.text
    if not image.pre_norm:
        _refuse("model.image.pre_norm=false", "CLIP's ViT always has its ln_pre")
    if image.patch_bias:
        _refuse("model.image.patch_bias=true with a class token", "CLIP's patch embedding has no bias")
    for side, tower in (("image", image), ("text", text)):
        if tower.head_bias:
            _refuse(f"the {side} head's bias (model.{side}.head_bias=true)", "CLIP projects without a bias")
    if has_logit_bias:
        _refuse(
            "the logit bias (loss.kind=siglip) of a model with CLIP's towers",
            "CLIPModel has no logit bias, and SiglipModel needs SigLIP's towers: model.image.pool=map, "
            "model.text.causal=false",
        )


def _check_siglip_text(model: ModelConfig) -> None:
    image, text = model.image, model.text
    if image.head != "identity":
        _refuse(f"the image head (model.image.head={image.head!r})", "SigLIP has no image projection")
    if text.kind != "transformer":
        _refuse(f"the text tower (model.text.kind={text.kind!r}, {text.name})", "SigLIP's text tower is its own")
    if text.causal:
        _refuse("model.text.causal=true with attention pooling", "SigLIP's text tower is bidirectional")
    if resolve_pooling(text) != "last":
        _refuse(f"model.text.pooling={text.pooling!r} with attention pooling", "SigLIP pools the last position")


# ----------------------------------------------------------------------------------------------
# The state in the type's canonical layout, and the end-of-text id
# ----------------------------------------------------------------------------------------------
def canonical_state(
    model: ModelConfig, state: dict[str, torch.Tensor], model_type: str
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(config, state)`` with what the type always has made explicit: identity heads as identity matrices,
    absent biases (SigLIP's patch and text head biases, its logit bias) as zeros. Outputs are unchanged."""
    model, state = copy.deepcopy(model), dict(state)
    siglip = model_type in SIGLIP_TYPES
    for side, tower in (("image", model.image), ("text", model.text)):
        if tower.head == "identity" and not (siglip and side == "image"):
            state[f"{side}_head.proj.weight"] = torch.eye(model.embed_dim)
            tower.head = "linear"
    if siglip:
        if model.image.kind == "vit" and not model.image.patch_bias:
            state["image_tower.patch_embed.bias"] = torch.zeros(model.image.width)
            model.image.patch_bias = True
        if not model.text.head_bias:
            state["text_head.proj.bias"] = torch.zeros(model.embed_dim)
            model.text.head_bias = True
        state.setdefault("logit_bias", torch.tensor(0.0))
    return model, state


def _end_of_text_id(loaded: LoadedModel) -> int:
    """The one id every caption of the check batch ends with (its last real token), or a refusal."""
    tokens = loaded.processor.text(CHECK_CAPTIONS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    last = ids[torch.arange(len(ids)), mask.sum(dim=1) - 1]
    end = int(last[0])
    if (last != end).any() or ((ids == end) & (mask == 1)).sum(dim=1).ne(1).any():
        _refuse(
            "model.text.pooling='eot' with this tokenizer",
            "its captions do not all end with one end-of-text token, where transformers' CLIP pools",
        )
    return end


def text_pooling_ids(loaded: LoadedModel, model_type: str) -> tuple[int | None, tuple[int, int] | None]:
    """``(the eos_token_id to write, the id swap that makes it possible or None)`` (module docstring)."""
    text = loaded.config.model.text
    if model_type != "clip":  # SigLIP pools the last position, MetaCLIP 2 its eos id, a hosted model its own rule
        return (text.eos_token_id if model_type == "metaclip_2" else loaded.tokenizer.eos_token_id), None
    pooling = resolve_pooling(text)
    if pooling == "argmax":
        return CLIP_LEGACY_EOS_ID, None  # exactly the rule that makes transformers pool at argmax(input_ids)
    end = text.eos_token_id if pooling == "eos" else _end_of_text_id(loaded)
    if end != CLIP_LEGACY_EOS_ID:
        return end, None
    if not isinstance(loaded.tokenizer, BpeTokenizer):
        _refuse(
            "a text tower pooled at end-of-text id 2",
            "transformers' CLIP reads eos_token_id=2 as 'pool at argmax(input_ids)', and only clipforge's own BPE "
            "tokenizer can be renumbered (with model.text.pooling='eos' it exports as MetaCLIP 2)",
        )
    return loaded.tokenizer.vocab_size - 1, (CLIP_LEGACY_EOS_ID, loaded.tokenizer.vocab_size - 1)


def _swap_rows(weight: torch.Tensor, swap: tuple[int, int]) -> torch.Tensor:
    first, second = swap
    weight = weight.clone()
    weight[[first, second]] = weight[[second, first]]
    return weight


# ----------------------------------------------------------------------------------------------
# Writing and checking
# ----------------------------------------------------------------------------------------------
def _check_folder(folder: Path) -> None:
    """A Hugging Face folder is new or empty: another model's tokenizer files beside this one's would mix."""
    if folder.exists() and (not folder.is_dir() or any(p.name != LOCK_NAME for p in folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; choose another --out or remove it first")


def _write_tokenizer(loaded: LoadedModel, tokenizer: Tokenizer, scratch: Path, kind: HFModelType) -> None:
    """The processor's tokenizer (portable, see ``Processor.save_pretrained``), declaring the inputs the type's
    model takes (``text_inputs``; SigLIP's ``input_ids`` alone, see the module docstring)."""
    loaded.processor.with_tokenizer(tokenizer).save_pretrained(scratch)
    path = scratch / "tokenizer_config.json"
    if kind.text_inputs is not None and path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        config["model_input_names"] = list(kind.text_inputs)
        atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n", replace=True)


def _write(loaded: LoadedModel, scratch: Path) -> HFModelType:
    """Write the model, tokenizer and image processor into ``scratch``; returns the type written."""
    import transformers

    config = loaded.config.model
    state = {key: value.detach().float().cpu() for key, value in loaded.model.state_dict().items()}
    text_config_json = loaded.model.text_tower.hf_config_json()
    kind = export_type(config, loaded.model.logit_bias is not None, text_config_json)
    canonical, state = canonical_state(config, state, kind.model_type)
    eos, swap = text_pooling_ids(loaded, kind.model_type)
    tokenizer = loaded.tokenizer
    rows = "text_tower.token_embedding.weight"
    if swap is not None:
        tokenizer = tokenizer.with_swapped_ids(*swap)
        state[rows] = _swap_rows(state[rows], swap)
    vocab_rows = state[rows].shape[0] if rows in state else 0
    inputs = ExportInputs(canonical, tokenizer, vocab_rows, eos, float(state["log_logit_scale"]), text_config_json)
    with quiet_transformers():
        hf_config = getattr(transformers, kind.config_class)(**kind.export_config(inputs))
        hf_model = getattr(transformers, kind.model_class)(hf_config)
        hf_model.load_state_dict(invert(state, kind.rules(canonical, text_config_json)), strict=True)
        hf_model.save_pretrained(str(scratch))
        _write_tokenizer(loaded, tokenizer, scratch, kind)
        image_processor(loaded.processor.preprocess, kind.model_type).save_pretrained(str(scratch))
    return kind


def check_images() -> list[Image.Image]:
    """Small random images of :data:`CHECK_IMAGE_SIZES` (fixed seed): what the export check embeds."""
    generator = np.random.default_rng(0)
    return [
        Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for width, height in CHECK_IMAGE_SIZES
    ]


def hf_image_inputs(pixel_values: torch.Tensor, model_type: str) -> dict[str, torch.Tensor]:
    """clipforge's pixel values as the transformers model of ``model_type`` takes them (NaFlex: unpacked)."""
    if model_type != "siglip2":
        return {"pixel_values": pixel_values}
    values, mask, shapes = unpack(pixel_values)
    return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def _max_difference(loaded: LoadedModel, scratch: Path, kind: HFModelType) -> float:
    """The largest difference of embeddings and logits, transformers (reloaded from ``scratch``) vs clipforge."""
    import transformers

    with quiet_transformers():
        hf_model = getattr(transformers, kind.model_class).from_pretrained(str(scratch)).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(scratch))
    padding = "max_length" if loaded.tokenizer.padding == "max_length" else "longest"
    length = loaded.processor.context_length
    # the tokenizer's whole output, as transformers' own pipeline hands it to the model
    encoded = dict(
        hf_tokenizer(CHECK_CAPTIONS, padding=padding, truncation=True, max_length=length, return_tensors="pt")
    )
    tokens = loaded.processor.text(CHECK_CAPTIONS)
    pixels = loaded.processor.images(check_images())
    model = loaded.model.float().eval().cpu()
    with torch.no_grad():
        theirs = hf_model(**encoded, **hf_image_inputs(pixels, kind.model_type))
        ours = model(pixels, tokens["input_ids"], tokens["attention_mask"])
        logits = ours.logits_per_image
    differences = [
        (F.normalize(theirs.image_embeds, dim=-1) - ours.image_embeds).abs().max(),
        (F.normalize(theirs.text_embeds, dim=-1) - ours.text_embeds).abs().max(),
        (theirs.logits_per_image - logits).abs().max() / logits.abs().max().clamp(min=1.0),
    ]
    return float(max(differences))


def export_hf(loaded: LoadedModel, out_dir: str | Path, atol: float = 1e-4) -> HFExport:
    """Write ``loaded`` as a Hugging Face folder (module docstring); ``out_dir`` must be new or empty.

    Raises CheckpointError for a model without a Hugging Face counterpart or when transformers' outputs differ
    from clipforge's by more than ``atol`` (logits relative to their largest magnitude); nothing is written then.
    """
    folder = Path(out_dir)
    _check_folder(folder)
    with staged_folder(folder, "export hf") as scratch:
        kind = _write(loaded, scratch)
        difference = _max_difference(loaded, scratch, kind)
        if difference > atol:
            raise CheckpointError(
                f"the exported {kind.model_type} model differs from clipforge's by {difference:.2e} (> {atol}): the "
                f"export is not faithful for this model, so nothing was written; {ONNX_HINT}"
            )
    for note in processor_differences(loaded.processor.preprocess):
        logger.warning("%s: transformers' image processor differs from clipforge's: %s", folder, note)
    return HFExport(folder, kind.model_type, kind.model_class, difference)
