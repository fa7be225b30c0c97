"""Where an open_clip spec's model config, preprocessing, weights and tokenizer come from.

The forms after ``open_clip:`` (open_clip's own ways of naming a model):

* ``NAME``: a model config of the installed open_clip's registry (``open_clip.list_models()``, e.g.
  ``ViT-B-16-SigLIP2``), at random init: exactly the model ``open_clip.create_model(NAME)`` builds, no network;
* ``NAME:WEIGHTS``: that config with a local state dict; ``NAME:TAG``: one of open_clip's pretrained tags for it
  (``open_clip.list_pretrained_tags_by_model``), downloaded by open_clip where the network allows, with the tag's
  preprocessing;
* ``CONFIG.json:WEIGHTS``: a model config file (``model_configs/ViT-B-32.json``, or a hub repository's
  ``open_clip_config.json`` with its ``preprocess_cfg``) and a state dict;
* ``local-dir:FOLDER``: a folder as open_clip's ``local-dir:`` reads it: ``open_clip_config.json``, the weights
  (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``) and, for a Hugging Face tokenizer, its files;
* ``hf-hub:ORG/REPO``: the same from the Hugging Face hub, downloaded by open_clip where the network allows (offline,
  download the repository and use ``local-dir:``).

A registry name, a tag and the hub need open_clip installed (``pip install 'clipforge[open_clip]'``); a config file
or folder of a model the built-in towers express needs only CLIP's vocabulary file (which open_clip ships).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.config import CheckpointError
from clipforge.logs import quiet_loggers
from clipforge.model.hosted_open_clip import OPEN_CLIP_INSTALL
from clipforge.packaged import MissingPackageError

logger = logging.getLogger("clipforge")

SPEC_PREFIX = "open_clip:"
HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
CONFIG_FILE = "open_clip_config.json"
# the weights files a model folder may hold, in open_clip's order of preference
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                  "open_clip_pytorch_model.pth")  # fmt: skip
FORMS = (
    "open_clip:NAME[:WEIGHTS or :TAG] (a name of open_clip.list_models()), open_clip:CONFIG.json:WEIGHTS, "
    "open_clip:local-dir:FOLDER or open_clip:hf-hub:ORG/REPO"
)


@dataclass
class OpenClipSource:
    """An open_clip model located: its ``model_cfg`` and ``preprocess_cfg``, its ``weights`` file (None: open_clip's
    random init of the registry model ``name``), the ``tokenizer_folder`` holding a Hugging Face tokenizer's files
    (a ``local-dir:`` folder; None: ``hf_tokenizer_name`` says where), and ``where`` (the spec, for messages)."""

    model_cfg: dict[str, Any]
    where: str
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    name: str | None = None
    tokenizer_folder: Path | None = None


def open_clip_module() -> Any:
    """The installed open_clip package, or one line naming the extra."""
    try:
        import open_clip
    except ImportError:
        raise MissingPackageError(f"open_clip model names and downloads need open_clip: {OPEN_CLIP_INSTALL}") from None
    return open_clip


def locate(spec: str) -> OpenClipSource:
    """The source ``spec`` names (module docstring); CheckpointError naming the spec when it names nothing."""
    rest = spec.removeprefix(SPEC_PREFIX)
    if not rest:
        raise CheckpointError(f"{spec!r} names no model; an open_clip spec is {FORMS}")
    if rest.startswith(HUB):
        return _from_hub(rest.removeprefix(HUB), spec)
    if rest.startswith(LOCAL_DIR):
        return _from_folder(Path(rest.removeprefix(LOCAL_DIR)).expanduser(), spec)
    config, separator, weights = rest.partition(".json:")
    if separator:
        if not config or not weights:
            raise CheckpointError(f"{spec!r}: an open_clip config spec is open_clip:CONFIG.json:WEIGHTS")
        model_cfg, preprocess = read_model_config(Path(config + ".json").expanduser(), spec)
        return OpenClipSource(model_cfg, spec, preprocess, existing_weights(Path(weights).expanduser(), spec))
    if rest.endswith(".json"):
        raise CheckpointError(f"{spec!r} names a config without weights: open_clip:CONFIG.json:WEIGHTS")
    name, _, weights = rest.partition(":")
    return _from_registry(name, weights, spec)


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


def existing_weights(path: Path, where: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{where}: no weights file {str(path)!r}")
    return path


def _from_folder(folder: Path, where: str) -> OpenClipSource:
    if not folder.is_dir():
        raise CheckpointError(f"{where}: no folder {str(folder)!r} (a folder with {CONFIG_FILE} and the weights)")
    model_cfg, preprocess = read_model_config(folder / CONFIG_FILE, where)
    weights = next((folder / name for name in FOLDER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{where}: {folder} holds no weights ({' or '.join(FOLDER_WEIGHTS[:3])})")
    return OpenClipSource(model_cfg, where, preprocess, weights, tokenizer_folder=folder)


def _from_hub(repository: str, where: str) -> OpenClipSource:
    open_clip_module()
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        with _quiet_hub():
            config_path = Path(download_pretrained_from_hf(repository, filename=CONFIG_FILE))
            weights = Path(download_pretrained_from_hf(repository))
    except Exception:  # noqa: BLE001 - no network, no such repository, no access: the same fix
        raise CheckpointError(
            f"{where}: {CONFIG_FILE} and the weights of {repository} could not be downloaded from the Hugging Face "
            f"hub (no network, no such repository, or HF_HUB_OFFLINE=1 without a cached copy); offline, download "
            "the repository and import open_clip:local-dir:FOLDER"
        ) from None
    model_cfg, preprocess = read_model_config(config_path, where)
    return OpenClipSource(model_cfg, where, preprocess, weights)


def _quiet_hub() -> contextlib.AbstractContextManager[None]:
    """huggingface_hub's retry warnings held back: a failed download ends in one message of ours."""
    return quiet_loggers(("huggingface_hub",), logging.ERROR)


def _from_registry(name: str, weights: str, where: str) -> OpenClipSource:
    open_clip = open_clip_module()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CheckpointError(
            f"{where}: {name!r} is not a model of open_clip's registry{hint}; open_clip.list_models() lists them, "
            f"and {FORMS} are the spec's forms"
        )
    if not weights:
        return OpenClipSource(model_cfg, where, name=name)
    path = Path(weights).expanduser()
    if path.is_file():
        return OpenClipSource(model_cfg, where, weights=path, name=name)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if weights not in tags:
        raise CheckpointError(
            f"{where}: {weights!r} is neither a weights file nor one of open_clip's pretrained tags for {name} "
            f"({', '.join(tags) or 'none'})"
        )
    return _from_tag(open_clip, name, weights, model_cfg, where)


def _from_tag(open_clip: Any, name: str, tag: str, model_cfg: dict[str, Any], where: str) -> OpenClipSource:
    """open_clip's download of a pretrained tag, with the tag's preprocessing (what its transforms use)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name, tag)
    try:
        with _quiet_hub():
            weights = Path(download_pretrained(pretrained_cfg))
    except Exception:  # noqa: BLE001 - no network, no such file: the same fix
        raise CheckpointError(
            f"{where}: open_clip could not download the {tag!r} weights (no network, or HF_HUB_OFFLINE=1 without a "
            f"cached copy); offline, give a local state dict: open_clip:{name}:FILE"
        ) from None
    preprocess = {
        key: pretrained_cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in pretrained_cfg
    }
    if pretrained_cfg.get("quick_gelu", False) != model_cfg.get("quick_gelu", False):
        logger.warning(  # open_clip warns too, and builds the config as it is: so does the import
            "%s: the %r weights were trained with quick_gelu=%s, but the %s config says otherwise; the -quickgelu "
            "config is the one that fits them",
            where,
            tag,
            pretrained_cfg.get("quick_gelu", False),
            name,
        )
    return OpenClipSource(model_cfg, where, preprocess, weights, name=name)
