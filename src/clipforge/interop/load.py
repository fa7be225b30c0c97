"""Released or earlier weights by one spec: :func:`from_pretrained`, the import command's checkpoint, and
``model.init`` (:func:`init_model`, what the trainer calls to start from them).

A spec is ``hf:<folder or hub id>`` (a Hugging Face CLIPModel / SiglipModel, :mod:`clipforge.interop.hf`),
``open_clip:CONFIG.json:WEIGHTS`` (:mod:`clipforge.interop.open_clip`) or the path of a clipforge checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    build_model,
    hf_text_config,
    load_checkpoint,
    save_checkpoint,
)
from clipforge.config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict
from clipforge.data.tokenize import Tokenizer
from clipforge.interop.hf import import_hf
from clipforge.interop.open_clip import SPEC_PREFIX as OPEN_CLIP_PREFIX
from clipforge.interop.open_clip import import_open_clip, parse_spec
from clipforge.model import CLIPModel

HF_PREFIX = "hf:"
SPEC_HELP = "hf:<folder or hub id>, open_clip:CONFIG.json:WEIGHTS, or the path of a clipforge checkpoint"
# tower fields that say how to train, not what the model is: model.init keeps the run config's
TRAINING_FIELDS = ("lock", "lr_scale", "layer_decay")
# tower fields without effect on imported weights (random init, hub weights): the import's are kept, unchecked
UNCHECKED_FIELDS = ("pretrained", "pretrained_keys", "head_init", "head_dropout")


def from_pretrained(spec: str, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """The model, tokenizer and config ``spec`` names (module docstring), in eval mode on ``device``.

    Imported models come back with ``step`` 0 and a config whose model section describes them exactly (its
    tokenizer is the model's own, saved in any checkpoint written from it). Every problem with the spec or
    its files raises CheckpointError (or FileNotFoundError) with a message that names it.
    """
    if spec.startswith(HF_PREFIX):
        loaded = import_hf(spec.removeprefix(HF_PREFIX))
    elif spec.startswith(OPEN_CLIP_PREFIX):
        loaded = import_open_clip(*parse_spec(spec))
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            raise CheckpointError(f"{spec!r} is a folder; for a Hugging Face model folder write hf:{spec}")
        if not path.is_file():
            raise CheckpointError(f"{spec!r} is not a file; a weights spec is {SPEC_HELP}")
        return load_checkpoint(path, device)
    loaded.model.to(device)
    return loaded


def save_imported_checkpoint(loaded: LoadedCheckpoint, path: str | Path, source: str) -> Path:
    """Write ``loaded`` as an ordinary clipforge checkpoint (what ``load_checkpoint`` reads) at ``path``; an
    existing ``path`` is refused unless the user asked to overwrite (``clipforge.io.atomic_write``'s policy).
    ``source`` is recorded as ``imported_from``."""
    path = Path(path)
    return save_checkpoint(
        path,
        {
            "config": config_to_dict(loaded.config),
            "tokenizer": loaded.tokenizer.state_dict(),
            "hf_text_config": hf_text_config(loaded.model),
            "model": {key: value.detach().cpu() for key, value in loaded.model.state_dict().items()},
            "step": 0,
            "imported_from": source,
        },
    )


# ----------------------------------------------------------------------------------------------
# model.init: fine-tuning what was imported
# ----------------------------------------------------------------------------------------------
@dataclass
class InitialModel:
    """What a run that starts from ``model.init`` trains: ``config`` is the run's config with the model section
    of the imported weights (and the run's own ``lock``/``lr_scale``/``layer_decay``); ``model`` is built for it
    (locks applied) and holds those weights; ``tokenizer`` is theirs."""

    config: Config
    tokenizer: Tokenizer
    model: CLIPModel


def _merge_section(run: Any, imported: Any, defaults: Any, where: str, spec: str) -> Any:
    """``imported`` with the run's training fields; a field the run sets differently from both is refused."""
    merged = copy.deepcopy(imported)
    for field in dataclasses.fields(run):
        name, value = field.name, getattr(run, field.name)
        if dataclasses.is_dataclass(value):
            sub = _merge_section(value, getattr(imported, name), getattr(defaults, name), f"{where}.{name}", spec)
            setattr(merged, name, sub)
        elif name in TRAINING_FIELDS:
            setattr(merged, name, value)
        elif name not in UNCHECKED_FIELDS and value != getattr(defaults, name) and value != getattr(imported, name):
            raise ConfigError(
                f"model.init={spec!r} brings its own {where}.{name}={getattr(imported, name)!r}, but the config sets "
                f"{value!r}: remove {where}.{name} from the config (the imported model decides it) or drop model.init"
            )
    return merged


def merged_model_config(run: ModelConfig, imported: ModelConfig) -> ModelConfig:
    """The imported model's section, with the run's ``init`` and training fields (see :func:`_merge_section`)."""
    run_fields = copy.deepcopy(run)
    run_fields.init = ""  # the spec itself is the run's, never compared
    merged = _merge_section(run_fields, imported, ModelConfig(), "model", run.init)
    merged.init = run.init
    return merged


def init_model(config: Config) -> InitialModel:
    """Start a run from ``config.model.init``: the imported model, rebuilt for the run's config.

    The architecture, tokenizer and preprocessing come from the weights; the run's ``loss.kind`` must fit them
    (a SigLIP model has a logit bias, a CLIP model none). Raises ConfigError / CheckpointError that say which
    field or file is wrong. The trainer calls this once, before anything else is built, and uses the returned
    config everywhere (it is what its checkpoints store, so a resumed run rebuilds the same model).
    """
    spec = config.model.init
    if not spec:
        raise ValueError("init_model needs config.model.init: " + SPEC_HELP)
    loaded = from_pretrained(spec)
    imported_loss = loaded.config.loss.kind
    if imported_loss != config.loss.kind:
        has = "a logit bias" if imported_loss == "siglip" else "no logit bias"
        raise ConfigError(
            f"model.init={spec!r} is a {imported_loss} model ({has}) but loss.kind={config.loss.kind!r}: "
            f"set loss.kind={imported_loss}"
        )
    run_config = _run_config(config, loaded.config.model)
    model = build_model(run_config, loaded.tokenizer, pretrained=False, text_config_json=hf_text_config(loaded.model))
    model.load_state_dict(loaded.model.state_dict())
    return InitialModel(run_config, loaded.tokenizer, model.train())


def resumed_init_config(config: Config, saved: dict[str, Any]) -> Config:
    """The run config :func:`init_model` gave the run whose checkpoint holds the config dict ``saved``, rebuilt
    from that dict alone: a resumed ``model.init`` run takes its weights and tokenizer from the checkpoint, so
    nothing is imported again (and the weights ``model.init`` names need not be there any more). The same
    merge and checks as :func:`init_model`, with the checkpoint's model section as the imported one."""
    try:
        saved_config = config_from_dict(saved)
    except ConfigError as error:
        raise ConfigError(
            f"the checkpoint to resume holds a config that does not fit this clipforge: {error}"
        ) from None
    if saved_config.model.init != config.model.init:
        raise ConfigError(
            f"model.init={config.model.init!r}, but the checkpoint's run started from "
            f"model.init={saved_config.model.init!r}: resume with the run's own config.yaml (saved next to it)"
        )
    if saved_config.loss.kind != config.loss.kind:
        raise ConfigError(
            f"loss.kind={config.loss.kind!r}, but the checkpoint's run trained with loss.kind="
            f"{saved_config.loss.kind!r} (its model has {'a' if saved_config.loss.kind == 'siglip' else 'no'} "
            f"logit bias): set loss.kind={saved_config.loss.kind}"
        )
    return _run_config(config, saved_config.model)


def _run_config(config: Config, imported: ModelConfig) -> Config:
    run_config = copy.deepcopy(config)
    run_config.model = merged_model_config(config.model, imported)
    # the weights come from model.init: nothing may fetch a tower's own (hub) weights for this run
    run_config.model.image.pretrained = run_config.model.text.pretrained = None
    return config_from_dict(config_to_dict(run_config))  # the merged whole, validated again
