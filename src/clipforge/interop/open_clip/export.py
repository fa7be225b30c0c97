"""Export a clipforge model as an open_clip model folder, checked with open_clip at export.

``export_open_clip(loaded, out_dir)`` writes the layout open_clip's ``local-dir:`` (and a hub repository) holds:

* ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``, the model config open_clip builds and its
  image preprocessing (size, mean/std, interpolation, ``resize_mode``);
* ``open_clip_model.safetensors``: the state dict in open_clip's names (the import's key map, inverted);
* for a Hugging Face tokenizer, its files (``local-dir:`` reads them from the folder).

So ``open_clip.create_model_and_transforms("local-dir:OUT")`` and ``open_clip.get_tokenizer("local-dir:OUT")`` give
the same embeddings as clipforge, through open_clip's own transform and tokenizer; a model of open_clip's registry
also loads as ``create_model_and_transforms(NAME, pretrained="OUT/open_clip_model.safetensors")`` (with open_clip's
default preprocessing for NAME). CLIP_benchmark takes the same two arguments.

What exports: every model an open_clip import gives (hosted towers by their own config and names, a CoCa model as
its contrastive towers: open_clip's ``CustomTextCLIP``), and models with the built-in towers in open_clip's layouts:
a class-token ViT (no patch bias, a bias-free linear projection) and the text transformer pooled at ``argmax``,
``eos``, ``first`` or ``last`` (``eot`` is written as ``eos`` at the tokenizer's end-of-text id), with a linear
projection or none, one activation for both (GELU, QuickGELU or tanh-GELU). Refused with the part named: timm /
torchvision / Hugging Face towers of clipforge's own kinds, SigLIP's attention-pooled built-in ViT, MLP heads, mean
pooling (``clipforge export onnx`` exports any model). A resize rule open_clip cannot express (``resize_size`` beyond
the crop, transformers' crop rounding or resize kernel) is written as open_clip's nearest rule with a warning.

After writing, the folder is loaded back with open_clip and its embeddings compared with clipforge's (random images,
captions of different lengths tokenized by each side's own tokenizer); a difference above ``atol`` fails the export
and nothing is left in ``out_dir``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.config import CheckpointError, ConfigError, ImageTowerConfig, ModelConfig, TextTowerConfig
from clipforge.data.processor import Processor
from clipforge.data.tokenize import BpeTokenizer, Tokenizer
from clipforge.data.transforms import ImagePreprocess
from clipforge.folders import LOCK_NAME, staged_folder
from clipforge.interop.keymaps import invert
from clipforge.interop.open_clip.architecture import CLIP_BPE_VOCAB_SIZE, TANH_GELU
from clipforge.interop.open_clip.keys import IMAGE_PREFIX, TEXT_PREFIX, hosted_keys, open_clip_rules
from clipforge.interop.open_clip.source import CONFIG_FILE, open_clip_module
from clipforge.model.factory import LoadedModel
from clipforge.model.hosted_open_clip import quiet_open_clip, tower_source
from clipforge.model.text import resolve_pooling

logger = logging.getLogger("clipforge")

WEIGHTS_FILE = "open_clip_model.safetensors"
CHECK_CAPTIONS = ["a photo", "a small red circle on a white page", "two dogs", "x"]
ONNX_HINT = "clipforge export onnx exports any model"
POOL_TYPES = {"argmax": "argmax", "eos": "eos", "cls": "first", "last": "last"}  # clipforge -> open_clip
ACTS_USING_QUICK_GELU = ("gelu", "quick_gelu")


@dataclass
class OpenClipExport:
    """What :func:`export_open_clip` wrote, and the largest difference between open_clip's embeddings (reloaded from
    the folder) and clipforge's."""

    folder: Path
    max_difference: float


def _refuse(part: str, why: str) -> None:
    raise CheckpointError(f"{part} has no open_clip counterpart ({why}); {ONNX_HINT}")


# ----------------------------------------------------------------------------------------------
# The model config
# ----------------------------------------------------------------------------------------------
def _act_fields(act: str, where: str) -> tuple[dict[str, Any], bool | None]:
    """(the act_kwargs of a converted tower's ``act``, the quick_gelu it needs: None = either)."""
    if act == "gelu_tanh":
        return {"act_kwargs": dict(TANH_GELU)}, False
    if act not in ACTS_USING_QUICK_GELU:
        _refuse(f"{where}.act={act!r}", "open_clip's towers use GELU, QuickGELU or tanh-GELU")
    return {}, act == "quick_gelu"


def mlp_ratio(width: int, ratio: float) -> float:
    """The ``mlp_ratio`` that gives open_clip the hidden width clipforge built: clipforge rounds ``width * ratio``,
    open_clip truncates it, so a ratio just under the hidden width's (8191.9999 for 8192) is nudged half a unit up."""
    hidden = int(round(width * ratio))
    exact = hidden / width
    return exact if int(width * exact) == hidden else (hidden + 0.5) / width


def _norm(eps: float) -> dict[str, Any]:
    return {} if eps == 1e-5 else {"norm_kwargs": {"eps": eps}}


def vision_section(image: ImageTowerConfig, image_size: int) -> tuple[dict[str, Any], bool | None]:
    """``(vision_cfg, the quick_gelu it needs)`` of the image tower (module docstring)."""
    if image.kind == "open_clip":
        source = tower_source(image.open_clip, "vision_cfg", "model.image.open_clip")
        vision = source["vision_cfg"]
        uses_act = not vision.get("timm_model_name") and not isinstance(vision.get("layers"), list)
        return vision, bool(source.get("quick_gelu", False)) if uses_act else None
    if image.kind != "vit":
        _refuse(f"a {image.kind} image tower", "open_clip hosts timm towers through its own configs")
    if image.pool != "cls":
        _refuse("a built-in ViT with attention pooling", "open_clip's SigLIP models are timm towers")
    if image.patch_bias:
        _refuse("a patch embedding with a bias", "open_clip's ViT has none")
    if image.head != "linear" or image.head_bias:
        _refuse(f"an image head {image.head!r} (bias {image.head_bias})", "open_clip's ViT ends in a bias-free matrix")
    act, quick_gelu = _act_fields(image.act, "model.image")
    vision = {
        "image_size": image_size,
        "patch_size": image.patch_size,
        "width": image.width,
        "layers": image.depth,
        "head_width": image.width // image.heads,
        "mlp_ratio": mlp_ratio(image.width, image.mlp_ratio),
        **({} if image.pre_norm else {"no_ln_pre": True}),
        **act,
        **_norm(image.norm_eps),
    }
    return vision, quick_gelu


def text_section(
    text: TextTowerConfig, tokenizer: Tokenizer, context_length: int
) -> tuple[dict[str, Any], bool | None]:
    """``(text_cfg without its tokenizer keys, the quick_gelu it needs)`` of the text tower (module docstring)."""
    if text.kind == "open_clip":
        source = tower_source(text.open_clip, "text_cfg", "model.text.open_clip")
        section = {k: v for k, v in source["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
        uses_act = not section.get("hf_model_name")
        return section, bool(source.get("quick_gelu", False)) if uses_act else None
    if text.kind != "transformer":
        _refuse(f"a {text.kind} text tower", "open_clip hosts Hugging Face encoders through its own configs")
    pooling = resolve_pooling(text)
    fields: dict[str, Any] = {}
    if pooling == "eot":  # the last real token: the end-of-text token, found by its id as open_clip finds it
        pooling, fields["eos_id"] = "eos", tokenizer.eos_token_id
    elif pooling == "eos":
        fields["eos_id"] = text.eos_token_id
    if pooling not in POOL_TYPES:
        _refuse(f"text pooling {pooling!r}", "open_clip pools one token")
    if text.head == "mlp":
        _refuse("an MLP text head", "open_clip's text projection is linear")
    act, quick_gelu = _act_fields(text.act, "model.text")
    section = {
        "context_length": context_length,
        "vocab_size": text.vocab_size or tokenizer.vocab_size,
        "width": text.width,
        "heads": text.heads,
        "layers": text.depth,
        "mlp_ratio": mlp_ratio(text.width, text.mlp_ratio),
        "pool_type": POOL_TYPES[pooling],
        **fields,
        **({} if text.causal else {"no_causal_mask": True}),
        **({"proj_type": "none"} if text.head == "identity" else {"proj_bias": True} if text.head_bias else {}),
        "pad_id": tokenizer.pad_token_id,
        **act,
        **_norm(text.norm_eps),
    }
    return section, quick_gelu


def _is_clip_bpe(tokenizer: Tokenizer) -> bool:
    """CLIP's BPE, which open_clip's own ``SimpleTokenizer`` gives (no Hugging Face tokenizer name then)."""
    backend = getattr(tokenizer, "_backend", None)
    return type(backend).__name__.startswith("CLIPTokenizer") and tokenizer.vocab_size == CLIP_BPE_VOCAB_SIZE


def tokenizer_keys(tokenizer: Tokenizer, name: str) -> dict[str, Any]:
    """The ``text_cfg`` keys that give open_clip the same tokenizer (its files are written beside the config)."""
    rules = {"clean": tokenizer.clean} if getattr(tokenizer, "clean", "") else {}
    if _is_clip_bpe(tokenizer):
        return {"tokenizer_kwargs": rules} if rules and rules["clean"] != "lower" else {}
    if getattr(tokenizer, "strip_sep_token", False):
        rules["strip_sep_token"] = True
    return {"hf_tokenizer_name": name or "clipforge-tokenizer", **({"tokenizer_kwargs": rules} if rules else {})}


def open_clip_configs(
    model: ModelConfig, processor: Processor, logit_bias: float | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)``: the open_clip config of the model ``model`` describes, with ``processor``'s
    preprocessing and tokenizer and the model's ``logit_bias`` (module docstring)."""
    preprocess = processor.preprocess
    tokenizer = processor.tokenizer
    vision, image_quick_gelu = vision_section(model.image, preprocess.image_size)
    text, text_quick_gelu = text_section(model.text, tokenizer, processor.context_length)
    text.update(tokenizer_keys(tokenizer, model.text.tokenizer.name if model.text.tokenizer.kind == "hf" else ""))
    needed = {flag for flag in (image_quick_gelu, text_quick_gelu) if flag is not None}
    if len(needed) > 1:
        _refuse("QuickGELU in one tower and GELU in the other", "open_clip's quick_gelu is one flag for both")
    model_cfg: dict[str, Any] = {"embed_dim": model.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if needed == {True}:
        model_cfg["quick_gelu"] = True
    if model.text.kind == "open_clip":
        model_cfg["custom_text"] = True  # the text tower under text.: CustomTextCLIP
    if logit_bias is not None:
        model_cfg["init_logit_bias"] = logit_bias
    preprocess_cfg = {
        "size": preprocess.image_size,
        "mode": "RGB",
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "interpolation": preprocess.interpolation,
        "resize_mode": preprocess.resize_mode,
    }
    for note in _preprocess_differences(preprocess):
        logger.warning("open_clip's transform differs from clipforge's: %s", note)
    return model_cfg, preprocess_cfg


def _preprocess_differences(preprocess: ImagePreprocess) -> list[str]:
    notes = []
    if preprocess.resize_mode == "shortest" and preprocess.short_side != preprocess.image_size:
        notes.append(f"it resizes the short side to the crop ({preprocess.image_size}), not to {preprocess.short_side}")
    if preprocess.resize_mode == "shortest" and preprocess.crop_rounding == "floor":
        notes.append("its center crop rounds a half-pixel offset half to even, not down")
    if preprocess.resize_backend == "torchvision":
        notes.append("it resizes PIL images with PIL, not torchvision's tensor kernel (a level in a few pixels)")
    return notes


# ----------------------------------------------------------------------------------------------
# Writing and checking
# ----------------------------------------------------------------------------------------------
def open_clip_state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """The model's weights in open_clip's names (the import's key map inverted; the text tower at the top level,
    ``CLIP``'s layout, unless it is hosted: ``text.``)."""
    model = loaded.config.model
    state = {key: value.detach().float().cpu() for key, value in loaded.model.state_dict().items()}
    image_keys = hosted_keys(state, IMAGE_PREFIX) if model.image.kind == "open_clip" else None
    text_keys = hosted_keys(state, TEXT_PREFIX) if model.text.kind == "open_clip" else None
    rules = open_clip_rules(model, "", loaded.model.logit_bias is not None, image_keys, text_keys)
    return {key: value.contiguous() for key, value in invert(state, rules).items()}


def _write(loaded: LoadedModel, scratch: Path) -> None:
    from safetensors.torch import save_file

    bias = loaded.model.logit_bias
    model_cfg, preprocess_cfg = open_clip_configs(
        loaded.config.model, loaded.processor, None if bias is None else float(bias.detach())
    )
    state = open_clip_state_dict(loaded)
    (scratch / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n", encoding="utf-8"
    )
    save_file(state, str(scratch / WEIGHTS_FILE))
    if "hf_tokenizer_name" in model_cfg["text_cfg"]:
        tokenizer = loaded.tokenizer
        if isinstance(tokenizer, BpeTokenizer):
            tokenizer.save_pretrained(scratch, loaded.processor.context_length)
        else:
            loaded.processor.save_pretrained(scratch)


def _max_difference(loaded: LoadedModel, scratch: Path) -> float:
    """The largest difference of normalized embeddings, open_clip (reloaded from ``scratch``) vs clipforge, and of the
    temperature."""
    open_clip = open_clip_module()
    with quiet_open_clip():
        reference = open_clip.create_model(f"local-dir:{scratch}", pretrained_text=False).eval()
        tokenize = open_clip.get_tokenizer(f"local-dir:{scratch}")
    size = loaded.processor.image_size
    pixels = torch.randn(len(CHECK_CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = loaded.processor.text(CHECK_CAPTIONS)
    model = loaded.model.float().eval().cpu()
    with torch.no_grad():
        theirs = (reference.encode_image(pixels, normalize=True), reference.encode_text(tokenize(CHECK_CAPTIONS), True))
        ours = model(pixels, tokens["input_ids"], tokens["attention_mask"])
        scales = (reference.logit_scale.exp().reshape(()), ours.logit_scale)
    differences = [
        (theirs[0] - ours.image_embeds).abs().max(),
        (theirs[1] - ours.text_embeds).abs().max(),
        (scales[0] - scales[1]).abs() / scales[1],
    ]
    return float(max(differences))


def export_open_clip(loaded: LoadedModel, out_dir: str | Path, atol: float = 1e-4) -> OpenClipExport:
    """Write ``loaded`` as an open_clip model folder (module docstring); ``out_dir`` must be new or empty.

    Raises CheckpointError for a model without an open_clip counterpart or when open_clip's embeddings differ from
    clipforge's by more than ``atol``; nothing is written then. Needs open_clip (the check loads the folder with it).
    """
    folder = Path(out_dir)
    if folder.exists() and (not folder.is_dir() or any(p.name != LOCK_NAME for p in folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; choose another --out or remove it first")
    open_clip_module()
    with staged_folder(folder, "export open_clip") as scratch:
        try:
            _write(loaded, scratch)
        except ConfigError as error:  # a hosted tower's config field that does not read
            raise CheckpointError(f"the checkpoint's model cannot be written for open_clip: {error}") from None
        difference = _max_difference(loaded, scratch)
        if difference > atol:
            raise CheckpointError(
                f"the exported open_clip model differs from clipforge's by {difference:.2e} (> {atol}): the export is "
                f"not faithful for this model, so nothing was written; {ONNX_HINT}"
            )
    return OpenClipExport(folder, difference)
