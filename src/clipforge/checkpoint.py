"""One self-describing checkpoint format: weights, full config, tokenizer and library version.

A checkpoint is a ``torch.save`` dict of plain values and tensors only, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs code from the file. It is written
to a temporary file in the same folder, flushed to disk, then renamed over the target: a crash while
saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.config import Config, ConfigError, config_from_dict
from clipforge.data.tokenize import Tokenizer
from clipforge.io import atomic_write
from clipforge.model import CLIPModel, create_model
from clipforge.version import __version__

FORMAT = "clipforge-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable clipforge checkpoint; the message says what is wrong and the fix."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus format and version stamps) to ``path``."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "clipforge_version": __version__, **state}
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU without executing code, checking that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a run's last.pt or step_<N>.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(
            f"{path} could not be read as a checkpoint ({error}); it may be truncated or not a torch file"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a clipforge checkpoint (no '{FORMAT}' stamp). For Hugging Face or open_clip weights: "
            "clipforge import hf:FOLDER (or open_clip:CONFIG.json:WEIGHTS) --out model.pt, or model.init in a config"
        )
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this clipforge "
            f"({__version__}, format {FORMAT_VERSION}) reads; upgrade clipforge"
        )
    return state


def offline_model_config(config: Config) -> Config:
    """The config with hub weights switched off: a checkpoint's own weights replace them anyway."""
    config = copy.deepcopy(config)
    config.model.image.pretrained = None
    config.model.text.pretrained = None
    return config


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` gives back: a ready model, its tokenizer and the run's config."""

    model: CLIPModel
    tokenizer: Tokenizer
    config: Config
    step: int


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model and tokenizer of a checkpoint, in eval mode on ``device``."""
    state = read_checkpoint(path)
    try:
        config = config_from_dict(state["config"])
    except ConfigError as error:
        raise CheckpointError(f"{path}: its saved config does not fit this clipforge version: {error}") from error
    tokenizer = Tokenizer.from_state_dict(state["tokenizer"])
    model = build_model(config, tokenizer, pretrained=False, text_config_json=state.get("hf_text_config"))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model its config builds (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); the checkpoint comes from an incompatible clipforge version"
        )
    return LoadedCheckpoint(model.to(device).eval(), tokenizer, config, int(state.get("step", 0)))


def hf_text_config(model: CLIPModel) -> str | None:
    """The Hugging Face config (JSON) of a ``hf`` text tower, stored in checkpoints; None otherwise.

    With it a checkpoint rebuilds its text tower offline, even when ``model.text.name`` is a hub id.
    """
    return model.text_tower.hf_config_json()


def build_model(
    config: Config, tokenizer: Tokenizer, pretrained: bool = True, text_config_json: str | None = None
) -> CLIPModel:
    """The run's model for this tokenizer.

    ``pretrained=False`` skips hub/local weight loading (a checkpoint's weights replace them);
    ``text_config_json`` (from :func:`hf_text_config`) builds a ``hf`` text tower from that config
    instead of fetching ``model.text.name``'s.
    """
    model_config = (config if pretrained else offline_model_config(config)).model
    if text_config_json is None or model_config.text.kind != "hf":
        return create_model(
            model_config,
            loss_kind=config.loss.kind,
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_token_id,
        )
    model_config = copy.deepcopy(model_config)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "config.json").write_text(text_config_json)
        model_config.text.name = folder
        return create_model(
            model_config,
            loss_kind=config.loss.kind,
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_token_id,
        )
