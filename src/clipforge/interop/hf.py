"""Import a Hugging Face two-tower model (a local folder, or a hub id where the network allows): ``clip``,
``siglip``, ``siglip2``, ``metaclip_2``, ``chinese_clip`` and ``altclip`` (:mod:`clipforge.interop.hf_types`).

:func:`import_hf` reads the folder as ``save_pretrained`` wrote it, without building the transformers model:

* ``config.json`` -> its ``model_type``'s :class:`~clipforge.interop.hf_types.HFModelType`, which turns the
  transformers config into the clipforge model section (built-in towers in the released layout's explicit fields,
  or a hosted transformers module where the built-in towers cannot express it);
* ``preprocessor_config.json`` -> ``model.image``'s mean/std, interpolation and resize rule
  (:mod:`clipforge.interop.hf_types.preprocess`): what ``AutoImageProcessor.from_pretrained(folder)`` does;
* the tokenizer files -> the checkpoint's tokenizer, through ``AutoTokenizer.from_pretrained(folder)``, so it is the
  class transformers picks for the folder (CLIP's BPE, SigLIP's SentencePiece, SigLIP 2's lower-casing Gemma,
  XLM-R's, BERT's); SigLIP and SigLIP 2 pad every text to the full length (``tokenizer.padding: max_length``);
* the weights (``model.safetensors``, sharded or not, or ``pytorch_model.bin`` read with ``weights_only``) ->
  clipforge's names through the type's explicit key map, strictly (every tensor read, every weight filled).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from clipforge.config import CheckpointError, ConfigError, config_from_dict
from clipforge.data.hf_loading import looks_like_path, quiet_transformers
from clipforge.data.tokenize import TOKENIZER_FILES, HFTokenizer, load_hf_tokenizer
from clipforge.interop.hf_types import HF_MODEL_TYPES, HFModelType, ImportContext
from clipforge.interop.hf_types.preprocess import read_preprocess
from clipforge.interop.keymaps import convert
from clipforge.interop.resolved import Resolved
from clipforge.model.factory import make_processor

logger = logging.getLogger("clipforge")

# buffers transformers saved with the weights in some versions; they are no weights (arange(n), zeros)
IGNORED_SUFFIXES = ("position_ids", "token_type_ids")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def supported_types() -> str:
    """The importable model types as messages name them: ``CLIPModel (model_type 'clip'), ...``."""
    return ", ".join(f"{kind.model_class} (model_type {key!r})" for key, kind in HF_MODEL_TYPES.items())


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


def read_hf_config(folder: Path, where: str) -> tuple[HFModelType, Any]:
    """``(model type, transformers config)`` of ``folder``; only the types of ``HF_MODEL_TYPES`` are accepted."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{where}: {folder} has no config.json, so it is no saved model; point hf: at a folder written by "
            f"save_pretrained of a {' or '.join(kind.model_class for kind in HF_MODEL_TYPES.values())}"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where}: {path} is not valid JSON ({error})") from error
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in HF_MODEL_TYPES:
        architectures = raw.get("architectures") if isinstance(raw, dict) else None
        raise CheckpointError(
            f"{where} holds a model of model_type {model_type!r} (architectures {architectures}); "
            f"clipforge imports {supported_types()}"
        )
    import transformers

    kind = HF_MODEL_TYPES[model_type]
    with quiet_transformers():
        return kind, getattr(transformers, kind.config_class).from_dict(raw)


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
            f"{where}: its tokenizer does not load ({str(error).strip().splitlines()[0]}); SentencePiece tokenizers "
            "(SigLIP's, XLM-R's without a tokenizer.json) need pip install 'clipforge[siglip]'"
        ) from error


def declared_max_length(folder: Path) -> int | None:
    """The ``model_max_length`` the folder's ``tokenizer_config.json`` declares, or None."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("model_max_length")
    return int(value) if isinstance(value, int | float) and value > 0 else None


def import_hf(location: str) -> Resolved:
    """A Hugging Face model (folder or hub id) as a clipforge config, weights (clipforge's names) and processor
    (its tokenizer and its image processor's rule); a hosted text tower's own config comes with them."""
    where = f"hf:{location}"
    folder = resolve_folder(location)
    kind, hf_config = read_hf_config(folder, where)
    values = kind.model_section(hf_config, ImportContext(location, declared_max_length(folder), where))
    image = values["model"]["image"]
    image.update(read_preprocess(folder, kind.model_type, hf_config.vision_config, image["image_size"], where))
    values["model"]["text"]["tokenizer"] = {"kind": "hf", "name": location, "padding": kind.text_padding}
    try:
        config = config_from_dict(values)
    except ConfigError as error:
        raise CheckpointError(f"{where}: the model does not fit a clipforge config: {error}") from error
    tokenizer = read_hf_tokenizer(folder, kind.text_padding, where)
    text_config_json = hf_config.text_config.to_json_string() if kind.hosted_text else None
    state = {kind.module_name(key): tensor for key, tensor in read_hf_weights(folder, where).items()}
    ignored = [key for key in state if key.endswith(IGNORED_SUFFIXES)]
    converted = convert(state, kind.rules(config.model, text_config_json), ignored, where)
    processor = make_processor(config.model, tokenizer)
    return Resolved(config, converted, processor, where, hf_text_config=text_config_json)
