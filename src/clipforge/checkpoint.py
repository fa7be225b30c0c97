"""The one checkpoint format: a typed :class:`Checkpoint`, one writer, one reader, and the upgrades of old formats.

A checkpoint is a ``torch.save`` dict of plain values and tensors only, so it loads with
``torch.load(weights_only=True)``: opening one never runs code from the file. It is written through
``clipforge.io.atomic_write`` (a temporary file renamed into place: a crash leaves the previous checkpoint whole).

What it holds (:class:`Checkpoint`): the resolved ``config``, the model's :class:`~clipforge.data.processor.Processor`
(tokenizer, context length, image preprocessing), the ``weights``, the ``step``, a Hugging Face text tower's own
config (``hf_text_config``), where an import came from, the moving average of the trained parameters when the run
keeps one (``ema``, ``train.ema``; files without it load with None), and - for a checkpoint of a training run - its
:class:`TrainingState` (optimizer, schedule, loss scaler, data position, random generators, evaluation state).
This module only turns that into bytes and back; models are built elsewhere (``clipforge.model.factory``, from what
``clipforge.interop.load`` resolves).

Format versions: files of an older format are upgraded on reading, one step at a time (:data:`UPGRADES`), so a
checkpoint written by any earlier clipforge still loads; a newer format than this clipforge knows is refused with
the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipforge.config import Config, ConfigError, config_from_dict, config_to_dict, upgrade_data_section
from clipforge.config.convert import build_dataclass
from clipforge.config.errors import CheckpointError
from clipforge.config.schema import ModelConfig
from clipforge.data.processor import Processor
from clipforge.data.tokenize import Tokenizer
from clipforge.io import atomic_write, shown
from clipforge.model.factory import make_processor
from clipforge.model.state_renames import rename_logit_scale, rename_logit_scale_in_optimizer
from clipforge.version import __version__

__all__ = ["Checkpoint", "CheckpointError", "TrainingState", "read_checkpoint", "save_checkpoint"]

FORMAT = "clipforge-checkpoint"
FORMAT_VERSION = 2


@dataclass
class TrainingState:
    """What a resumed run needs beyond the weights: the optimizer, schedule and loss scaler states, the data position
    (``samples_seen`` over all processes, the shard streams' layout ``data_streams``), the unreadable images seen so
    far, the random generators, the evaluator's best-so-far, and the number of processes that wrote it."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    samples_seen: int
    rng: dict[str, Any]
    scaler: dict[str, Any] = field(default_factory=dict)
    data_streams: int | None = None  # None: a checkpoint older than the shard streams' layout
    skipped_images: int = 0
    eval: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1


@dataclass
class Checkpoint:
    """A clipforge checkpoint, typed (see the module docstring)."""

    config: Config
    processor: Processor
    weights: dict[str, torch.Tensor]
    step: int = 0
    hf_text_config: str | None = None
    imported_from: str | None = None
    training: TrainingState | None = None
    clipforge_version: str = __version__
    ema: dict[str, torch.Tensor] | None = None

    def weights_for(self, which: str, where: str | Path = "the checkpoint") -> dict[str, torch.Tensor]:
        """The weights to use: ``raw`` (as trained) or ``ema`` (the moving average of the trained parameters laid
        over them: ``clipforge.train.ema``); CheckpointError naming ``where`` when there is no average."""
        if which == "raw":
            return self.weights
        if which != "ema":
            raise ValueError(f"weights={which!r}: choose raw or ema")
        if self.ema is None:
            raise CheckpointError(
                f"{where} holds no weight average: --weights ema needs a checkpoint of a run trained with train.ema "
                "(e.g. train.ema.decay=0.999); use --weights raw"
            )
        strangers = [
            key for key, value in self.ema.items() if getattr(self.weights.get(key), "shape", None) != value.shape
        ]
        if strangers:
            raise CheckpointError(f"{where}: its weight average does not fit its weights (at {strangers[0]}); damaged")
        return {**self.weights, **self.ema}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, checkpoint: Checkpoint, replace: bool = False) -> Path:
    """Write ``checkpoint`` to ``path`` (atomically); ``replace``: the caller owns an existing ``path`` (a run's own
    ``last.pt``), else an existing file is refused unless the user asked to overwrite (``clipforge.io``)."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clipforge_version": __version__,
        "config": config_to_dict(checkpoint.config),
        "processor": checkpoint.processor.state_dict(),
        "model": checkpoint.weights,
        "step": int(checkpoint.step),
        "hf_text_config": checkpoint.hf_text_config,
        "imported_from": checkpoint.imported_from,
        "training": dataclasses.asdict(checkpoint.training) if checkpoint.training is not None else None,
    }
    if checkpoint.ema is not None:  # absent otherwise: files without an average look as they always did
        payload["ema"] = checkpoint.ema
    return atomic_write(Path(path), lambda handle: torch.save(payload, handle), replace=replace)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``, upgraded to this version's format and typed; :class:`CheckpointError` naming the
    file and the fix when it is missing, not a clipforge checkpoint, damaged, or of a newer format."""
    payload = read_payload(path)
    try:
        # format 1 (and the first format-2 files) stored every data field for every kind; the upgrade drops those
        # a kind has not, and is a no-op on today's layout
        config = config_from_dict(upgrade_data_section(payload["config"]))
    except ConfigError as error:
        raise CheckpointError(f"{path}: its saved config does not fit this clipforge version: {error}") from None
    try:
        processor = Processor.from_state_dict(payload["processor"])
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: its tokenizer cannot be rebuilt ({shown(error)}); the file is damaged"
        ) from None
    training = payload.get("training")
    ema = payload.get("ema")
    if ema is not None and not (isinstance(ema, dict) and all(isinstance(v, torch.Tensor) for v in ema.values())):
        raise CheckpointError(f"{path}: its weight average (ema) is not a set of tensors; the file is damaged")
    try:
        training_state = TrainingState(**training) if training is not None else None
    except TypeError as error:
        raise CheckpointError(f"{path}: its training state is damaged ({shown(error)})") from None
    return Checkpoint(
        config=config,
        processor=processor,
        weights=payload["model"],
        step=int(payload.get("step") or 0),
        hf_text_config=payload.get("hf_text_config"),
        imported_from=payload.get("imported_from"),
        training=training_state,
        clipforge_version=str(payload.get("clipforge_version", "")),
        ema=ema,
    )


def read_payload(path: str | Path) -> dict[str, Any]:
    """The checkpoint's plain dict at this version's format (older formats upgraded), checked to be one of ours and
    whole enough to type; no code from the file runs (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a run's last.pt or step_<N>.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(
            f"{path} could not be read as a checkpoint ({shown(str(error))}); it may be truncated or not a torch file"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a clipforge checkpoint (no '{FORMAT}' stamp). For Hugging Face or open_clip weights: "
            "clipforge import hf:FOLDER (or open_clip:CONFIG.json:WEIGHTS) --out model.pt, or model.init in a config"
        )
    version = payload.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {shown(version)}, newer than this clipforge ({__version__}, format "
            f"{FORMAT_VERSION}) reads; upgrade clipforge"
        )
    try:
        while version < FORMAT_VERSION:
            payload = UPGRADES[version](payload)
            version += 1
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: a format-{version} checkpoint that cannot be upgraded ({shown(error)}); it is damaged"
        ) from None
    for key in ("config", "processor", "model"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(
                f"{path} has no {key} (a clipforge checkpoint holds config, processor and model); it is damaged or "
                "was not written by clipforge train or import"
            )
    return payload


# ----------------------------------------------------------------------------------------------
# Upgrades: format N's plain dict -> format N + 1's
# ----------------------------------------------------------------------------------------------
TRAINING_KEYS_V1 = (
    "optimizer",
    "scheduler",
    "scaler",
    "samples_seen",
    "data_streams",
    "skipped_images",
    "rng",
    "eval",
    "world_size",
)


def _upgrade_1_to_2(payload: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept the tokenizer and the training state at the top level, resolved the image preprocessing
    anew from the config at every load, and stored log t as ``logit_scale``. Format 2 holds a processor (the
    tokenizer, the context length and the preprocessing resolved once: here, as format 1 resolved it), the training
    state in one entry, and log t as ``log_logit_scale``."""
    payload = dict(payload)
    if not isinstance(payload.get("config"), dict) or "tokenizer" not in payload:
        raise CheckpointError("no config or no tokenizer")
    model = build_dataclass(ModelConfig, dict(payload["config"].get("model", {})), "model")
    payload["processor"] = make_processor(model, Tokenizer.from_state_dict(payload.pop("tokenizer"))).state_dict()
    # the temperature parameter holds log t under its own name now (format 1 called it logit_scale)
    payload["model"] = rename_logit_scale(payload["model"])
    training = {key: payload.pop(key) for key in TRAINING_KEYS_V1 if key in payload}
    if "optimizer" in training:  # an FSDP2 run keys its optimizer state by parameter name
        training["optimizer"] = rename_logit_scale_in_optimizer(training["optimizer"])
    payload["training"] = training if "optimizer" in training else None
    payload["format_version"] = 2
    return payload


UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _upgrade_1_to_2}
