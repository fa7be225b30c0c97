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

from clipforge.config import Config, ConfigError, config_from_dict, upgrade_data_section
from clipforge.config.errors import CheckpointError
from clipforge.data.tokenize import Tokenizer
from clipforge.io import atomic_write, shown
from clipforge.model import CLIPModel, create_model
from clipforge.model.pretrained import state_dict_problems
from clipforge.version import __version__

FORMAT = "clipforge-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any], replace: bool = False) -> Path:
    """Atomically write ``state`` (plus format and version stamps) to ``path``; ``replace``: the caller owns an
    existing ``path`` (a run's own ``last.pt``), else an existing file is refused (``clipforge.io.atomic_write``)."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "clipforge_version": __version__, **state}
    atomic_write(path, lambda handle: torch.save(payload, handle), replace=replace)
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
    """Rebuild the model and tokenizer of a checkpoint, in eval mode on ``device``.

    Every problem of the file is a :class:`CheckpointError` naming it: not a checkpoint, a config this version
    cannot read, no tokenizer, weights that do not fit the config (checked on a weightless model before the real
    one is allocated, so a config that asks for absurd sizes allocates nothing).
    """
    state = read_checkpoint(path)
    for key in ("config", "tokenizer", "model"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(
                f"{path} has no {key} (a clipforge checkpoint holds config, tokenizer and model); it is damaged or "
                "was not written by clipforge train or import"
            )
    try:
        # format 1 stored every data field for every kind: the upgrade drops those the kind has not
        config = config_from_dict(upgrade_data_section(state["config"]))
    except ConfigError as error:
        raise CheckpointError(f"{path}: its saved config does not fit this clipforge version: {error}") from error
    try:
        tokenizer = Tokenizer.from_state_dict(state["tokenizer"])
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: its tokenizer cannot be rebuilt ({shown(error)}); the file is damaged"
        ) from None
    model = build_checked_model(config, tokenizer, state["model"], str(path), state.get("hf_text_config"))
    return LoadedCheckpoint(model.to(device).eval(), tokenizer, config, int(state.get("step", 0)))


def build_checked_model(
    config: Config,
    tokenizer: Tokenizer,
    weights: dict[str, torch.Tensor],
    where: str,
    text_config_json: str | None = None,
) -> CLIPModel:
    """The model ``config`` describes, holding ``weights`` (a full state dict); raises :class:`CheckpointError`
    naming ``where`` when they do not fit.

    The architecture is first built on PyTorch's ``meta`` device, which allocates no memory, and compared key by
    key and shape by shape with ``weights``; only a config that fits them is built for real. So a config whose
    sizes are absurd (a width of 200,000, a hidden size of 10^9) costs nothing before it is refused, and the real
    model is never larger than the weights that fill it.
    """
    try:
        with torch.device("meta"):
            skeleton = build_model(config, tokenizer, pretrained=False, text_config_json=text_config_json)
        expected = skeleton.state_dict()
        del skeleton
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        raise CheckpointError(f"{where}: its config describes a model that cannot be built ({shown(error)})") from None
    tensors = {key: value for key, value in weights.items() if isinstance(value, torch.Tensor)}
    problems = state_dict_problems(tensors, expected, names=("weights", "config"))
    if problems or len(tensors) != len(weights):
        problems = problems or ["some weights are not tensors"]
        raise CheckpointError(
            f"{where}: the weights do not fit the model its config describes ({'; '.join(problems)}); the file is "
            "damaged or comes from an incompatible clipforge version"
        )
    model = build_model(config, tokenizer, pretrained=False, text_config_json=text_config_json)
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in tensors.items()})
    return model


# bytes one float32 parameter costs while training with AdamW: the weight, its gradient and two moments
TRAINING_BYTES_PER_PARAMETER = 16


def check_trainable_size(
    config: Config, tokenizer: Tokenizer, device: torch.device, text_config_json: str | None = None
) -> int:
    """The number of parameters of the model ``config`` describes, counted on the ``meta`` device (nothing is
    allocated); ``ConfigError`` when training it would need more memory than ``device`` has available (weights,
    gradients and AdamW's moments: :data:`TRAINING_BYTES_PER_PARAMETER` bytes each; activations come on top)."""
    try:
        with torch.device("meta"):
            skeleton = build_model(config, tokenizer, pretrained=False, text_config_json=text_config_json)
    except ConfigError:
        raise  # the builder's own message names the setting
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        raise ConfigError(f"model: the config describes a model that cannot be built ({shown(error)})") from None
    parameters = sum(parameter.numel() for parameter in skeleton.parameters())
    available = available_memory(device)
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    if available is not None and needed > available:
        raise ConfigError(
            f"model: {parameters:,} parameters need about {needed / 2**30:.1f} GiB to train (weights, gradients, "
            f"AdamW state), more than the {available / 2**30:.1f} GiB available on {device}; check the model "
            "section's sizes (width, depth, embed_dim, image_size)"
        )
    return parameters


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on ``device``: CUDA's free memory, or Linux's ``MemAvailable``; None when
    it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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
