"""Export a clipforge checkpoint as a Hugging Face folder: ``CLIPModel`` or ``SiglipModel``, checked at export.

``export_hf(loaded, out_dir)`` writes ``config.json`` + ``model.safetensors`` (``save_pretrained``), the tokenizer
files and ``preprocessor_config.json``, so ``CLIPModel.from_pretrained(out_dir)`` and ``AutoTokenizer`` /
``AutoImageProcessor`` load it offline. The image processor follows the checkpoint's resize rule, whichever the
model family: ``squash`` -> a ``SiglipImageProcessor`` resizing to ``{height, width}``; ``shortest`` -> a
``CLIPImageProcessor`` with ``shortest_edge`` = ``resize_size`` and the ``image_size`` center crop; mean/std and
interpolation are the checkpoint's. transformers rounds crop offsets down and resizes with torchvision by default:
a checkpoint that rounds half to even (``crop_rounding: round``) or resizes with PIL (``resize_backend: pil``,
then ``AutoImageProcessor.from_pretrained(out_dir, backend="pil")`` is exact) gets a warning saying so.

The family follows the model's layout: a class-token ViT with a causal text tower is a CLIP model; attention
pooling (``pool: map``) with a bidirectional text tower pooled at the last position is a SigLIP model. The weights
go through the same explicit key map as the import (:func:`clipforge.interop.keymaps.hf_rules`, inverted), so
import -> export is lossless.

What has no counterpart is refused with the part named: timm / torchvision image towers, Hugging Face text towers,
MLP heads, a logit bias on CLIP's towers, and the like; ``clipforge export onnx`` exports any model. Identity heads
become identity projections and missing biases zeros (the same outputs).

Text pooling: transformers' CLIP pools at the first ``eos_token_id`` of a row, except that a config saying
``eos_token_id == 2`` makes it pool at ``argmax(input_ids)`` (an old-config rule). clipforge's BPE puts ``<eos>`` at
id 2, so its export renumbers ``<eos>`` to the last id (the tokenizer and the embedding rows swap it with the
token there); another tokenizer whose end-of-text id is 2 is refused.

SigLIP reads its padding (every text padded to the full length, ``padding="max_length"``) and was trained without
a padding mask: call the exported ``SiglipModel`` with ``input_ids`` only (transformers masks padding when it is
given an ``attention_mask``, and its tokenizer returns one).

After writing, the folder is loaded back with transformers and its embeddings and logits compared with clipforge's
on captions of different lengths and random images; a difference above ``atol`` fails the export and nothing is
left in ``out_dir``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.config import BUILTIN_VIT_IMAGE_SIZE, CheckpointError, ModelConfig
from clipforge.data.hf_loading import quiet_transformers
from clipforge.data.tokenize import BpeTokenizer, Tokenizer
from clipforge.data.transforms import ImagePreprocess
from clipforge.folders import LOCK_NAME, staged_folder
from clipforge.interop.hf import CLIP_LEGACY_EOS_ID, HF_ACTIVATIONS, PIL_RESAMPLE
from clipforge.interop.keymaps import hf_rules, invert
from clipforge.model.factory import LoadedModel
from clipforge.model.text import resolve_pooling

logger = logging.getLogger("clipforge")

EXPORT_ACTIVATIONS = {ours: theirs for theirs, ours in HF_ACTIVATIONS.items()}
PIL_FILTERS = {name: code for code, name in PIL_RESAMPLE.items()}
CHECK_CAPTIONS = ["a photo", "a small red circle on a white page", "two dogs", "x"]
ONNX_HINT = "clipforge export onnx exports any model"


@dataclass
class HFExport:
    """What :func:`export_hf` wrote: the folder, the family (``clip`` | ``siglip``) and the largest difference
    between transformers' and clipforge's embeddings and logits on the check batch."""

    folder: Path
    family: str
    max_difference: float


def _refuse(part: str, why: str) -> None:
    raise CheckpointError(f"{part} has no Hugging Face counterpart ({why}); {ONNX_HINT}")


def hf_family(model: ModelConfig, has_logit_bias: bool) -> str:
    """``clip`` or ``siglip``: the transformers model that expresses ``model``; refuses what none does."""
    image, text = model.image, model.text
    if image.kind != "vit":
        _refuse(f"the image tower (model.image.kind={image.kind!r})", "CLIPModel and SiglipModel have ViT image towers")
    if text.kind != "transformer":
        _refuse(
            f"the text tower (model.text.kind={text.kind!r}, {text.name})",
            "CLIP's and SigLIP's text towers are their own transformers",
        )
    for side, tower in (("image", image), ("text", text)):
        if tower.head == "mlp":
            _refuse(f"the {side} head (model.{side}.head='mlp')", "CLIP and SigLIP project linearly")
    if image.pool == "map":
        _check_siglip(model)
        return "siglip"
    _check_clip(model, has_logit_bias)
    return "clip"


def _check_clip(model: ModelConfig, has_logit_bias: bool) -> None:
    image, text = model.image, model.text
    if not image.pre_norm:
        _refuse("model.image.pre_norm=false", "CLIP's ViT always has its ln_pre")
    if image.patch_bias:
        _refuse("model.image.patch_bias=true with a class token", "CLIP's patch embedding has no bias")
    for side, tower in (("image", image), ("text", text)):
        if tower.head_bias:
            _refuse(f"the {side} head's bias (model.{side}.head_bias=true)", "CLIP projects without a bias")
    if not text.causal:
        _refuse("model.text.causal=false with a class-token ViT", "CLIP's text tower is causal")
    if resolve_pooling(text) not in ("eot", "eos", "argmax"):
        _refuse(f"model.text.pooling={text.pooling!r}", "CLIP pools at the end-of-text token")
    if has_logit_bias:
        _refuse(
            "the logit bias (loss.kind=siglip) of a model with CLIP's towers",
            "CLIPModel has no logit bias, and SiglipModel needs SigLIP's towers: model.image.pool=map, "
            "model.text.causal=false",
        )


def _check_siglip(model: ModelConfig) -> None:
    image, text = model.image, model.text
    if image.pre_norm:
        _refuse("model.image.pre_norm=true with attention pooling", "SigLIP's ViT has no ln_pre")
    if image.head != "identity":
        _refuse(f"the image head (model.image.head={image.head!r})", "SiglipModel has no image projection")
    if text.causal:
        _refuse("model.text.causal=true with attention pooling", "SigLIP's text tower is bidirectional")
    if resolve_pooling(text) != "last":
        _refuse(f"model.text.pooling={text.pooling!r} with attention pooling", "SigLIP pools the last position")


# ----------------------------------------------------------------------------------------------
# The state in the family's canonical layout, and the end-of-text id
# ----------------------------------------------------------------------------------------------
def canonical_state(
    model: ModelConfig, state: dict[str, torch.Tensor], family: str
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(config, state)`` with what the family always has made explicit: identity heads as identity matrices,
    absent biases (SigLIP's patch and text head biases, its logit bias) as zeros. Outputs are unchanged."""
    model, state = copy.deepcopy(model), dict(state)
    for side, tower in (("image", model.image), ("text", model.text)):
        if tower.head == "identity" and not (family == "siglip" and side == "image"):
            state[f"{side}_head.proj.weight"] = torch.eye(model.embed_dim)
            tower.head = "linear"
    if family == "siglip":
        if not model.image.patch_bias:
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


def text_pooling_ids(loaded: LoadedModel, family: str) -> tuple[int | None, tuple[int, int] | None]:
    """``(the eos_token_id to write, the id swap that makes it possible or None)`` (module docstring)."""
    text = loaded.config.model.text
    if family == "siglip":
        return loaded.tokenizer.eos_token_id, None
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
            "tokenizer can be renumbered",
        )
    return loaded.tokenizer.vocab_size - 1, (CLIP_LEGACY_EOS_ID, loaded.tokenizer.vocab_size - 1)


def _swap_rows(weight: torch.Tensor, swap: tuple[int, int]) -> torch.Tensor:
    first, second = swap
    weight = weight.clone()
    weight[[first, second]] = weight[[second, first]]
    return weight


# ----------------------------------------------------------------------------------------------
# transformers objects
# ----------------------------------------------------------------------------------------------
def _tower_config(tower: Any) -> dict[str, Any]:
    return {
        "hidden_size": tower.width,
        "intermediate_size": int(round(tower.width * tower.mlp_ratio)),
        "num_hidden_layers": tower.depth,
        "num_attention_heads": tower.heads,
        "hidden_act": EXPORT_ACTIVATIONS[tower.act],
        "layer_norm_eps": tower.norm_eps,
    }


def hf_config(
    model: ModelConfig, family: str, tokenizer: Tokenizer, vocab_rows: int, eos: int | None, log_logit_scale: float
):
    """The transformers ``CLIPConfig`` / ``SiglipConfig`` of the canonical ``model``; ``log_logit_scale`` is log t,
    what ``CLIPConfig.logit_scale_init_value`` holds."""
    from transformers import CLIPConfig, SiglipConfig

    image, text = model.image, model.text
    vision = {**_tower_config(image), "image_size": image.image_size or BUILTIN_VIT_IMAGE_SIZE}
    vision.update(patch_size=image.patch_size, num_channels=3)
    text_config = {**_tower_config(text), "vocab_size": vocab_rows, "max_position_embeddings": text.context_length}
    text_config.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)
    with quiet_transformers():
        if family == "clip":
            return CLIPConfig(
                text_config=text_config,
                vision_config=vision,
                projection_dim=model.embed_dim,
                logit_scale_init_value=log_logit_scale,
            )
        return SiglipConfig(
            text_config={**text_config, "projection_size": model.embed_dim},
            vision_config={**vision, "vision_use_head": True},
        )


def image_processor(preprocess: ImagePreprocess):
    """The transformers image processor of ``preprocess``'s resize rule (module docstring)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    size = {"height": preprocess.image_size, "width": preprocess.image_size}
    common = {
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
        "resample": PIL_FILTERS[preprocess.interpolation],
    }
    if preprocess.resize_mode == "squash":
        return SiglipImageProcessor(size=size, **common)
    return CLIPImageProcessor(size={"shortest_edge": preprocess.short_side}, crop_size=size, **common)


def processor_differences(preprocess: ImagePreprocess) -> list[str]:
    """What transformers' default image processor does otherwise than ``preprocess`` (empty: nothing)."""
    notes = []
    if preprocess.resize_mode == "shortest" and preprocess.crop_rounding != "floor":
        notes.append(
            "its center crop rounds the offset (resized - crop) / 2 down where this checkpoint rounds half to even "
            "(crop_rounding: round), one pixel apart on some non-square images"
        )
    if preprocess.resize_backend != "torchvision":
        notes.append(
            "by default it resizes with torchvision on tensors where this checkpoint resizes with PIL (one level "
            "apart in a few pixels); AutoImageProcessor.from_pretrained(folder, backend='pil') resizes as it does"
        )
    return notes


def _model_class(family: str):
    from transformers import CLIPModel, SiglipModel

    return CLIPModel if family == "clip" else SiglipModel


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def _check_folder(folder: Path) -> None:
    """A Hugging Face folder is new or empty: another model's tokenizer files beside this one's would mix."""
    if folder.exists() and (not folder.is_dir() or any(p.name != LOCK_NAME for p in folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; choose another --out or remove it first")


def _write(loaded: LoadedModel, scratch: Path) -> tuple[str, Tokenizer]:
    """Write the model, tokenizer and image processor into ``scratch``; returns the family and the tokenizer
    as exported (renumbered or not)."""
    config = loaded.config.model
    state = {key: value.detach().float().cpu() for key, value in loaded.model.state_dict().items()}
    family = hf_family(config, loaded.model.logit_bias is not None)
    canonical, state = canonical_state(config, state, family)
    eos, swap = text_pooling_ids(loaded, family)
    processor = loaded.processor
    if swap is not None:
        processor = processor.with_tokenizer(processor.tokenizer.with_swapped_ids(*swap))
        rows = "text_tower.token_embedding.weight"
        state[rows] = _swap_rows(state[rows], swap)
    vocab_rows = state["text_tower.token_embedding.weight"].shape[0]
    hf_model_config = hf_config(
        canonical, family, processor.tokenizer, vocab_rows, eos, float(state["log_logit_scale"])
    )
    with quiet_transformers():
        hf_model = _model_class(family)(hf_model_config)
        hf_model.load_state_dict(invert(state, hf_rules(canonical, family)), strict=True)
        hf_model.save_pretrained(str(scratch))
        processor.save_pretrained(scratch)
        image_processor(processor.preprocess).save_pretrained(str(scratch))
    return family, processor.tokenizer


def _max_difference(loaded: LoadedModel, scratch: Path, family: str) -> float:
    """The largest difference of embeddings and logits, transformers (reloaded from ``scratch``) vs clipforge."""
    from transformers import AutoTokenizer

    context_length = loaded.processor.context_length
    size = loaded.processor.image_size
    pixels = torch.randn(len(CHECK_CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(0))
    with quiet_transformers():
        hf_model = _model_class(family).from_pretrained(str(scratch)).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(str(scratch))
    padding = "max_length" if loaded.tokenizer.padding == "max_length" else "longest"
    encoded = hf_tokenizer(
        CHECK_CAPTIONS, padding=padding, truncation=True, max_length=context_length, return_tensors="pt"
    )
    tokens = loaded.processor.text(CHECK_CAPTIONS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    # SigLIP was trained without a padding mask, and clipforge computes it so; transformers masks when given one
    text_inputs = {"input_ids": encoded["input_ids"]}
    if family == "clip":
        text_inputs["attention_mask"] = encoded["attention_mask"]
    model = loaded.model.float().eval().cpu()
    with torch.no_grad():
        theirs = hf_model(**text_inputs, pixel_values=pixels)
        ours = model(pixels, ids, mask)
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
        family, _ = _write(loaded, scratch)
        difference = _max_difference(loaded, scratch, family)
        if difference > atol:
            raise CheckpointError(
                f"the exported {family} model differs from clipforge's by {difference:.2e} (> {atol}): the "
                f"export is not faithful for this model, so nothing was written; {ONNX_HINT}"
            )
    for note in processor_differences(loaded.processor.preprocess):
        logger.warning("%s: transformers' image processor differs from clipforge's: %s", folder, note)
    return HFExport(folder, family, difference)
