"""From resolved pieces to a ready model: the one place that builds a :class:`CLIPModel` for a run, an import or a
checkpoint, and the one place that resolves a model's :class:`~clipforge.data.processor.Processor`.

Where the weights come from is decided elsewhere, once (``clipforge.interop.load``); this module only builds:
:func:`build_model` (random or pretrained towers), :func:`build_checked_model` (a full state dict, checked against
the config on PyTorch's ``meta`` device before anything is allocated), :func:`check_trainable_size` (a new
model's training state against the memory available) and :func:`make_processor`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from clipforge.config import CheckpointError, Config, ConfigError, ModelConfig
from clipforge.data.processor import Processor
from clipforge.data.tokenize import Tokenizer
from clipforge.io import shown
from clipforge.model.clip import CLIPModel
from clipforge.model.lora import add_adapters, holds_adapters
from clipforge.model.pretrained import state_dict_problems
from clipforge.model.registry import create_model
from clipforge.model.vision import resolve_image_preprocess

# bytes one float32 parameter costs while training with AdamW: the weight, its gradient and two moments
TRAINING_BYTES_PER_PARAMETER = 16


@dataclass
class LoadedModel:
    """A model ready to use (eval mode) with its processor and the config it was built from; ``step``: the
    training step its weights come from (0 for an import)."""

    model: CLIPModel
    processor: Processor
    config: Config
    step: int = 0

    @property
    def tokenizer(self) -> Tokenizer:
        return self.processor.tokenizer


def make_processor(config: ModelConfig, tokenizer: Tokenizer) -> Processor:
    """The processor of the model ``config`` describes, with ``tokenizer``: the one place where a model's image
    preprocessing (size, resize rule, mean/std, interpolation: ``resolve_image_preprocess``) and its context length
    are resolved. Checkpoints and exports then carry the resolved processor, not the request."""
    return Processor(tokenizer, config.text.context_length, resolve_image_preprocess(config.image))


def offline_model_config(config: Config) -> Config:
    """The config with hub weights switched off: weights that follow replace the towers' anyway."""
    config = copy.deepcopy(config)
    config.model.image.pretrained = None
    config.model.text.pretrained = None
    return config


def build_model(
    config: Config,
    tokenizer: Tokenizer,
    pretrained: bool = True,
    text_config_json: str | None = None,
    adapters: bool = True,
) -> CLIPModel:
    """The model ``config`` describes, for ``tokenizer``'s vocabulary.

    ``pretrained=False`` skips hub/local weight loading (weights that follow replace them); ``text_config_json``
    (a Hugging Face text tower's saved config) builds that tower from it instead of reading ``model.text.name``.
    ``adapters``: give the towers the LoRA adapters their ``lora`` asks for (``clipforge.model.lora``); False builds
    the model they adapt.
    """
    model_config = (config if pretrained else offline_model_config(config)).model
    model = create_model(
        model_config,
        loss_kind=config.loss.kind,
        vocab_size=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        text_config_json=text_config_json if model_config.text.kind in ("hf", "open_clip") else None,
    )
    if adapters:
        add_adapters(model, model_config)
    return model


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

    LoRA (``model.*.lora``): weights that hold adapters (a LoRA run's checkpoint) fill the adapted model; weights
    without (``model.init`` of a LoRA run) fill the model the adapters adapt, which then gets fresh adapters.
    """
    with_adapters = holds_adapters(weights)
    try:
        with torch.device("meta"):
            skeleton = build_model(
                config, tokenizer, pretrained=False, text_config_json=text_config_json, adapters=with_adapters
            )
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
    model = build_model(config, tokenizer, pretrained=False, text_config_json=text_config_json, adapters=with_adapters)
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in tensors.items()})
    if not with_adapters:
        add_adapters(model, config.model)
    return model


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
