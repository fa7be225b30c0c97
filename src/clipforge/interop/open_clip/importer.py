"""Importing an open_clip model: its config (``architecture``), weights (``keys``) and tokenizer (``tokenizer``),
resolved into a clipforge config, state dict and processor.

Weights files: ``.safetensors``, or a torch file read with ``weights_only=True`` (a training checkpoint's
``state_dict`` and a DDP ``module.`` prefix are unwrapped; OpenAI's size entries ``input_resolution`` /
``context_length`` / ``vocab_size`` are checked against the config and dropped). OpenAI's TorchScript archives (the
JIT ``ViT-B-32.pt``) are refused: reading them means running their code. OpenAI's weights were trained with QuickGELU:
use the ``-quickgelu`` config. Every tensor must find its place and every place its tensor; else the first unmatched
keys are named. A CoCa state dict's caption decoder (``text_decoder.``) is left out with the rest of it.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from clipforge.config import CheckpointError, Config
from clipforge.data.hf_loading import hf_from_pretrained
from clipforge.interop.keymaps import convert
from clipforge.interop.open_clip.architecture import open_clip_model_config
from clipforge.interop.open_clip.keys import hosted_keys, ignored_keys, open_clip_rules
from clipforge.interop.open_clip.source import OpenClipSource, locate, open_clip_module
from clipforge.interop.open_clip.tokenizer import open_clip_tokenizer
from clipforge.interop.resolved import Resolved
from clipforge.model.factory import make_processor
from clipforge.model.hosted_open_clip import quiet_open_clip

logger = logging.getLogger("clipforge")

# OpenAI's state dicts carry these as tensors; they are sizes, checked against the config, not weights
SIZE_KEYS = {"input_resolution": ("vision_cfg", "image_size"), "context_length": ("text_cfg", "context_length"),
             "vocab_size": ("text_cfg", "vocab_size")}  # fmt: skip
DECODER_PREFIX = "text_decoder."  # CoCa's caption decoder


def import_open_clip_spec(spec: str) -> Resolved:
    """The config, weights and processor of the open_clip model ``spec`` names (``clipforge.interop.open_clip.
    source`` lists the forms)."""
    return import_source(locate(spec))


def import_open_clip(config_path: Path, weights_path: Path) -> Resolved:
    """``open_clip:CONFIG.json:WEIGHTS``, from its two paths."""
    return import_open_clip_spec(f"open_clip:{config_path}:{weights_path}")


def import_source(source: OpenClipSource) -> Resolved:
    """A located open_clip model as a clipforge config, weights (clipforge's names) and processor."""
    where = source.where
    config = open_clip_model_config(source.model_cfg, source.preprocess_cfg, where)
    text_cfg = source.model_cfg["text_cfg"]
    hf_text_config = hf_text_config_json(text_cfg, where) if config.model.text.kind == "open_clip" else None
    state = read_weights(source.weights, where) if source.weights is not None else random_weights(source)
    weights = map_weights(config, source.model_cfg, state, where)
    tokenizer = open_clip_tokenizer(text_cfg, config.model.text.tokenizer.padding, where, source.tokenizer_folder)
    processor = make_processor(config.model, tokenizer)
    return Resolved(config, weights, processor, where, hf_text_config=hf_text_config)


def hf_text_config_json(text_cfg: dict[str, Any], where: str) -> str | None:
    """The Hugging Face config of a text tower open_clip builds from ``hf_model_name`` (a local folder, or the hub),
    as JSON: the checkpoint keeps it, so the tower rebuilds offline. None for open_clip's own text transformer."""
    name = text_cfg.get("hf_model_name")
    if not name:
        return None
    from transformers import AutoConfig

    config = hf_from_pretrained(AutoConfig.from_pretrained, name, f"{where} text_cfg.hf_model_name")
    values = json.loads(config.to_json_string())
    values.pop("_name_or_path", None)
    return json.dumps(values, sort_keys=True)


def random_weights(source: OpenClipSource) -> dict[str, torch.Tensor]:
    """The state dict of ``open_clip.create_model(name)``: the registry model at open_clip's own random init."""
    open_clip = open_clip_module()
    try:
        with quiet_open_clip():
            model = open_clip.create_model(source.name, pretrained=None)
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{source.where}: open_clip could not build {source.name} ({str(error).strip().splitlines()[0][:200]})"
        ) from None
    return model.state_dict()


# ----------------------------------------------------------------------------------------------
# Weights
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


def _square(size: Any) -> int:
    return int(size[0]) if isinstance(size, list | tuple) else int(size)


def _drop_size_keys(state: dict[str, torch.Tensor], model_cfg: dict[str, Any], where: str) -> None:
    """Remove OpenAI's size tensors from ``state``, in place, after checking them against the config."""
    for key, (section, field) in SIZE_KEYS.items():
        if key not in state:
            continue
        value = int(state.pop(key).item())
        expected = _square(model_cfg[section].get(field, value))
        if value != expected:
            raise CheckpointError(
                f"{where}: the weights were saved from a model with {key}={value}, but {section}.{field}={expected}"
            )


def map_weights(
    config: Config,
    model_cfg: dict[str, Any],
    state: dict[str, torch.Tensor],
    where: str,
) -> dict[str, torch.Tensor]:
    """``state`` (open_clip's names) in the names of the clipforge model ``config`` describes, strictly
    (``keys``); works on meta tensors too (the registry-wide check maps without allocating)."""
    state = dict(state)
    decoder = [key for key in state if key.startswith(DECODER_PREFIX)]
    if decoder:
        logger.info("%s: CoCa's caption decoder (%d tensors under %s) is left out", where, len(decoder), DECODER_PREFIX)
        for key in decoder:
            del state[key]
    if not any(value.is_meta for value in state.values()):
        _drop_size_keys(state, model_cfg, where)
    text_prefix = "text." if any(key.startswith("text.") for key in state) else ""  # CustomTextCLIP, CoCa
    ignored = ignored_keys(state)
    # a hosted module is open_clip's own, built from the same config: its tensors are the file's under its prefix
    # (the model built for the weights then checks each one's shape, and that none is missing)
    image_keys = hosted_keys(state, "visual.", ignored) if config.model.image.kind == "open_clip" else None
    text_keys = hosted_keys(state, "text.", ignored) if config.model.text.kind == "open_clip" else None
    rules = open_clip_rules(config.model, text_prefix, config.loss.kind == "siglip", image_keys, text_keys)
    return convert(state, rules, ignored, where)
