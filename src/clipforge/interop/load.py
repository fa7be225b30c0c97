"""Where a model's weights come from, decided once: a weights spec resolves here, in one place, to its config,
weights and processor (:func:`resolve`); the model is then built from that (:func:`build`).

A spec is ``hf:<folder or hub id>`` (a Hugging Face two-tower model, :mod:`clipforge.interop.hf`),
``open_clip:...`` (a name of open_clip's registry, a config and weights, a model folder or hub repository:
:mod:`clipforge.interop.open_clip`) or the path of a clipforge checkpoint.
Every command's ``--checkpoint``, ``clipforge.from_pretrained`` / ``load_checkpoint``, ``clipforge import`` and a
run's ``model.init`` (:func:`init_model`) take any of them.

What a spec resolves to is a plain model, ready to use: ``weights="ema"`` takes a checkpoint's moving average of its
trained parameters instead of the raw weights (``train.ema``), and LoRA adapters (``model.*.lora``) are folded into
the weights they adapt (:func:`fold_adapters`), so every command (eval, embed, search, export, merge) and every
export format sees one plain model whatever the run trained. (Resuming a run reads its checkpoint as it is.) (A tower's own ``pretrained`` weights, a file or a named
tag, are a tower's business: ``clipforge.model.pretrained``.)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint import Checkpoint, CheckpointError, read_checkpoint, save_checkpoint
from clipforge.config import Config, ConfigError, LoraConfig, ModelConfig, config_from_dict, config_to_dict
from clipforge.config.choices import WEIGHTS_CHOICES, WEIGHTS_SPEC_HELP
from clipforge.data.processor import Processor
from clipforge.interop.hf import import_hf
from clipforge.interop.open_clip import SPEC_PREFIX as OPEN_CLIP_PREFIX
from clipforge.interop.open_clip import import_open_clip_spec
from clipforge.interop.resolved import Resolved
from clipforge.model import CLIPModel
from clipforge.model.factory import LoadedModel, build_checked_model, hf_text_config
from clipforge.model.lora import adapted_towers, merge_adapters

HF_PREFIX = "hf:"
# a weights source other than a clipforge checkpoint: its spec prefix -> the importer that resolves the whole spec
# (a new source is one importer module plus its line here)
SOURCES: dict[str, Callable[[str], Resolved]] = {
    HF_PREFIX: lambda spec: import_hf(spec.removeprefix(HF_PREFIX)),
    OPEN_CLIP_PREFIX: import_open_clip_spec,
}
# tower fields that say how to train, not what the model is: model.init keeps the run config's
TRAINING_FIELDS = ("lock", "lr_scale", "layer_decay", "lora", "patch_dropout")
# tower fields without effect on imported weights (random init, hub weights): the import's are kept, unchecked
UNCHECKED_FIELDS = ("pretrained", "pretrained_keys", "head_init", "head_dropout")


def resolve(spec: str, weights: str = "raw") -> Resolved:
    """The config, weights and processor that ``spec`` names (module docstring): the one place that decides.

    ``weights``: ``raw`` (as trained) or ``ema`` (a checkpoint's moving average, ``train.ema``). Adapters are folded
    in (:func:`fold_adapters`). Every problem with the spec or its files raises CheckpointError (or
    FileNotFoundError) naming it.
    """
    spec = str(spec)
    if weights not in WEIGHTS_CHOICES:
        raise ConfigError(f"--weights {weights!r}: choose one of {list(WEIGHTS_CHOICES)}")
    for prefix, importer in SOURCES.items():
        if spec.startswith(prefix):
            if weights != "raw":
                raise CheckpointError(
                    f"{spec}: --weights {weights} needs a clipforge checkpoint of a run trained with train.ema; "
                    "imported weights have no moving average (use --weights raw)"
                )
            return importer(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{spec!r} is a folder; for a Hugging Face model folder write hf:{spec}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {spec!r} does not exist; a weights spec is {WEIGHTS_SPEC_HELP}")
    checkpoint = read_checkpoint(path)
    resolved = Resolved(
        checkpoint.config,
        checkpoint.weights_for(weights, spec),
        checkpoint.processor,
        spec,
        step=checkpoint.step,
        hf_text_config=checkpoint.hf_text_config,
        imported_from=checkpoint.imported_from,
    )
    return fold_adapters(resolved)


def fold_adapters(resolved: Resolved) -> Resolved:
    """``resolved`` with its LoRA adapters folded into the weights they adapt (``W + (alpha / r) B A``, peft's merge:
    ``clipforge.model.lora.merge_adapters``) and ``lora`` switched off in its config: the plain model that computes
    the same function (up to float rounding). Without adapters, ``resolved`` itself."""
    if not adapted_towers(resolved.config.model):
        return resolved
    model = build_checked_model(
        resolved.config, resolved.processor.tokenizer, resolved.weights, resolved.source, resolved.hf_text_config
    )
    merge_adapters(model)
    config = copy.deepcopy(resolved.config)
    config.model.image.lora, config.model.text.lora = LoraConfig(), LoraConfig()
    weights = {key: value.detach() for key, value in model.state_dict().items()}
    return dataclasses.replace(resolved, config=config, weights=weights)


def build(resolved: Resolved, device: str | torch.device = "cpu") -> LoadedModel:
    """The model ``resolved`` describes, holding its weights, in eval mode on ``device`` (checked before anything
    is allocated: ``clipforge.model.factory.build_checked_model``)."""
    model = build_checked_model(
        resolved.config, resolved.processor.tokenizer, resolved.weights, resolved.source, resolved.hf_text_config
    )
    return LoadedModel(model.to(device).eval(), resolved.processor, resolved.config, resolved.step)


def from_pretrained(spec: str | Path, device: str | torch.device = "cpu", weights: str = "raw") -> LoadedModel:
    """The model, processor and config ``spec`` names, in eval mode on ``device``: :func:`build` of
    :func:`resolve` (``weights``: ``raw`` or ``ema``, a checkpoint's moving average; adapters folded in). Imported
    models come back with ``step`` 0 and a config whose model section describes them exactly (their tokenizer and
    preprocessing are the source's own, in ``loaded.processor``)."""
    return build(resolve(str(spec), weights), device)


# a checkpoint is one kind of spec: one function for all of them
load_checkpoint = from_pretrained


def save_imported_checkpoint(loaded: LoadedModel, path: str | Path, source: str) -> Path:
    """Write ``loaded`` as an ordinary clipforge checkpoint at ``path`` (``source`` recorded as ``imported_from``);
    an existing ``path`` is refused unless the user asked to overwrite (``clipforge.io.atomic_write``'s policy)."""
    weights = {key: value.detach().cpu() for key, value in loaded.model.state_dict().items()}
    checkpoint = Checkpoint(
        loaded.config, loaded.processor, weights, hf_text_config=hf_text_config(loaded.model), imported_from=source
    )
    return save_checkpoint(path, checkpoint)


# ----------------------------------------------------------------------------------------------
# model.init: fine-tuning what was imported
# ----------------------------------------------------------------------------------------------
@dataclass
class RunStart:
    """Where a training run's model starts (:func:`run_start`): the run's ``config`` (with ``model.init``, the
    imported model's section merged in), and the ``weights``, ``processor`` and Hugging Face text config to start
    from, or None for a new model (random towers, or their own ``pretrained`` weights, and a tokenizer the run
    makes)."""

    config: Config
    processor: Processor | None = None
    weights: dict[str, torch.Tensor] | None = None
    hf_text_config: str | None = None
    source: str = ""


def run_start(config: Config, checkpoint: Checkpoint | None = None) -> RunStart:
    """The one decision of where a run's weights come from: the checkpoint it resumes (its weights and processor;
    a ``model.init`` run's config is rebuilt from the checkpoint, so nothing is imported again), else the weights
    ``model.init`` names (:func:`resolve`, merged into the run's config), else nothing (a new model)."""
    if checkpoint is not None:
        run_config = resumed_init_config(config, checkpoint.config) if config.model.init else config
        return RunStart(
            run_config, checkpoint.processor, checkpoint.weights, checkpoint.hf_text_config, "the checkpoint"
        )
    if not config.model.init:
        return RunStart(config)
    spec = config.model.init
    resolved = resolve(spec)
    imported_loss = resolved.config.loss.kind
    if imported_loss != config.loss.kind:
        has = "a logit bias" if imported_loss == "siglip" else "no logit bias"
        raise ConfigError(
            f"model.init={spec!r} is a {imported_loss} model ({has}) but loss.kind={config.loss.kind!r}: "
            f"set loss.kind={imported_loss}"
        )
    run_config = _run_config(config, resolved.config.model)
    return RunStart(run_config, resolved.processor, resolved.weights, resolved.hf_text_config, resolved.source)


@dataclass
class InitialModel:
    """What a run that starts from ``model.init`` trains: ``config`` is the run's config with the model section
    of the imported weights (and the run's own ``lock``/``lr_scale``/``layer_decay``); ``model`` is built for it
    (locks applied) and holds those weights; ``processor`` is theirs."""

    config: Config
    processor: Processor
    model: CLIPModel

    @property
    def tokenizer(self):  # noqa: ANN201 - the processor's
        return self.processor.tokenizer


def _merge_section(run: Any, imported: Any, defaults: Any, where: str, spec: str) -> Any:
    """``imported`` with the run's training fields; a field the run sets differently from both is refused."""
    merged = copy.deepcopy(imported)
    for field in dataclasses.fields(run):
        name, value = field.name, getattr(run, field.name)
        if name in TRAINING_FIELDS:
            setattr(merged, name, copy.deepcopy(value))
        elif dataclasses.is_dataclass(value):
            sub = _merge_section(value, getattr(imported, name), getattr(defaults, name), f"{where}.{name}", spec)
            setattr(merged, name, sub)
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
    """Start a run from ``config.model.init``: the imported model, built for the run's config (:func:`run_start`).

    The architecture, tokenizer and preprocessing come from the weights; the run's ``loss.kind`` must fit them
    (a SigLIP model has a logit bias, a CLIP model none). Raises ConfigError / CheckpointError that say which
    field or file is wrong.
    """
    if not config.model.init:
        raise ValueError("init_model needs config.model.init: " + WEIGHTS_SPEC_HELP)
    start = run_start(config)
    model = build_checked_model(
        start.config, start.processor.tokenizer, start.weights, start.source, start.hf_text_config
    )
    return InitialModel(start.config, start.processor, model.train())


def resumed_init_config(config: Config, saved_config: Config) -> Config:
    """The run config :func:`run_start` gave the run whose checkpoint holds ``saved_config``, rebuilt from it
    alone: a resumed ``model.init`` run takes its weights and processor from the checkpoint, so nothing is
    imported again (and the weights ``model.init`` names need not be there any more). The same merge and checks
    as for a new run, with the checkpoint's model section as the imported one."""
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
