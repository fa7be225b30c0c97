"""Typed settings for every stage, loaded from YAML and overridden with dotted keys.

A config is a tree of dataclasses. ``load_config("configs/demo.yaml", ["train.batch_size=64"])``
reads the YAML, applies the overrides and checks every key and value against the dataclass fields
*before anything runs*: an unknown key names the allowed keys, a wrong type names the expected type,
a choice field (``Literal``) names its allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message says which and what fits."""


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig:
    """How text becomes token ids.

    ``bpe``: a byte-level BPE trained on the *training* captions at the start of a run (held-out
    captions never shape the vocabulary) and saved inside every checkpoint.
    ``hf``: a Hugging Face tokenizer by hub id or local folder (``name``; empty means the text
    tower's ``name``).
    """

    kind: Literal["bpe", "hf"] = "bpe"
    name: str = ""
    vocab_size: int = 2048
    lowercase: bool = True


@dataclass
class ImageTowerConfig:
    """The image tower: a built-in ViT, a torchvision model or any timm model.

    ``pretrained``: where the weights come from. ``None`` = random init; ``"default"`` = the standard
    weights for ``name`` (torchvision's DEFAULT enum, timm's default tag); another string is a local
    file (``.pt``/``.pth``/``.safetensors`` state dict) when it exists on disk, else a torchvision
    weights enum name (``IMAGENET1K_V2``) or a timm pretrained tag (``in1k``).
    ``mean``/``std``: normalization; empty = the tower's own (ImageNet for torchvision/timm, CLIP's
    for the built-in ViT).
    """

    kind: Literal["vit", "torchvision", "timm"] = "vit"
    name: str = ""
    pretrained: str | None = None
    image_size: int = 64
    # built-in ViT only
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    # shared
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    freeze: bool = False
    head: Literal["linear", "mlp"] = "linear"
    head_dropout: float = 0.1


@dataclass
class TextTowerConfig:
    """The text tower: a built-in CLIP-style causal transformer or a Hugging Face encoder.

    ``pooling``: ``eot`` (the last non-padding token: the built-in transformer's end-of-text),
    ``cls`` (the first token) or ``mean`` (mean over non-padding tokens); ``auto`` = ``eot`` for the
    built-in tower, ``cls`` for Hugging Face encoders.
    ``pretrained`` (``hf`` only): ``None`` = random init from ``name``'s config; ``"default"`` =
    the weights of ``name``; another string = a hub id or local folder to load weights from.
    """

    kind: Literal["transformer", "hf"] = "transformer"
    name: str = ""
    pretrained: str | None = None
    pooling: Literal["auto", "eot", "cls", "mean"] = "auto"
    context_length: int = 32
    # built-in transformer only
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # shared
    freeze: bool = False
    head: Literal["linear", "mlp"] = "linear"
    head_dropout: float = 0.1
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class ModelConfig:
    """The two-tower model; ``embed_dim`` is the shared space both heads project into."""

    embed_dim: int = 128
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig:
    """Training-time augmentation; evaluation always uses resize + center crop."""

    scale_min: float = 0.8  # RandomResizedCrop area range is (scale_min, 1.0)
    hflip: bool = False  # off by default: captions say "left" and "right"


DataKind = Literal["emoji", "manifest", "coco", "flickr", "imagefolder", "webdataset", "hf", "idx", "cifar", "mix"]


@dataclass
class DataConfig:
    """Where images and captions (or labels) come from.

    ``kind`` picks the source; ``path`` is its main file or folder:

    - ``emoji``: the built-in Noto emoji set (no path; ``split``: train | val | test, concept-disjoint).
    - ``manifest``: a CSV/TSV/JSONL file with an ``image`` column (path relative to the manifest) and
      ``caption`` (several rows per image, or a JSONL ``captions`` list); optional ``label``.
    - ``coco``: ``captions_*.json`` (``images`` + ``annotations``); images in ``image_root``.
    - ``flickr``: a Karpathy split JSON (``dataset_flickr8k.json`` ..., with ``split``), a
      ``Flickr8k.token.txt`` file or a ``captions.txt`` CSV; images in ``image_root``.
    - ``imagefolder``: ``path/<class>/<image>``; readable names from ``classnames`` (JSON/TXT) if given.
    - ``webdataset``: tar shards, brace notation allowed (``data/{00000..00123}.tar``).
    - ``hf``: a ``datasets`` folder saved with ``save_to_disk``, or Parquet/Arrow files.
    - ``idx``: MNIST-family ``*-images-idx3-ubyte[.gz]`` (labels file found beside it).
    - ``cifar``: the CIFAR-10/100 python pickle folder.
    - ``mix``: the sources listed in ``mix``, sampled in proportion to their ``weight``.
    """

    kind: DataKind = "emoji"
    path: str = ""
    image_root: str = ""
    split: str = "train"
    classnames: str = ""
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"
    caption_sampling: Literal["random", "cycle"] = "random"
    # webdataset only
    epoch_size: int | None = None
    shuffle_buffer: int = 1000
    resample: bool = False
    # mix only: the sources, each with its weight
    mix: list[DataConfig] = field(default_factory=list)
    weight: float = 1.0
    # loading
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# ----------------------------------------------------------------------------------------------
# Loss, optimizer, schedule, training, logging
# ----------------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    """``clip``: symmetric softmax cross-entropy; ``siglip``: pairwise sigmoid with a learned bias.

    ``chunk_size``: when set, the loss is summed over row blocks of this many samples and never
    builds the N x N logit matrix (memory O(chunk_size * N)).
    """

    kind: Literal["clip", "siglip"] = "clip"
    chunk_size: int | None = None


@dataclass
class OptimConfig:
    """AdamW. Biases, norms, embeddings and the logit scale/bias get no weight decay."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6


@dataclass
class ScheduleConfig:
    """Linear warmup to ``optim.lr`` over ``warmup_steps``, then cosine to ``min_lr_ratio * lr``."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    """The training run.

    ``batch_size`` is the contrastive batch of one optimizer step. With ``accumulation_steps`` > 1 it
    is split into that many micro-batches and the step is still exact over the whole batch (the loss
    sees all ``batch_size`` pairs; see ``clipforge.train.loop``).
    """

    steps: int = 1000
    batch_size: int = 128
    accumulation_steps: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs/clipforge"
    checkpoint_every: int = 500
    keep_checkpoints: int = 0  # also keep this many step_<N>.pt files beside last.pt


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    """The whole run: one tree, saved next to the run and inside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------------------------
# Building a config from plain values, with errors that teach
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_name(item)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type, or raise."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; everyone writes learning rates that way
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            where = prefix or "the top level"
            raise ConfigError(f"unknown config key {dotted!r}{hint}; {where} allows {names}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain values (missing keys keep defaults)."""
    config = _build(Config, values or {})
    validate(config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain values (YAML/JSON/checkpoint-safe) of a config dataclass."""
    return dataclasses.asdict(config)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.batch_size=64", "loss.kind=siglip"]`` -> ``[("train.batch_size", 64), ...]``.

    Values are read as YAML scalars, so ``64`` is an int, ``1e-3`` a float, ``null`` None and
    ``[0.5, 0.5, 0.5]`` a list.
    """
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parsed.append((key.strip(), value))
    return parsed


RECIPES_PACKAGE = "clipforge.configs"


def recipe_names() -> list[str]:
    """Names of the YAML recipes shipped inside the package (``clipforge train demo`` finds them)."""
    from importlib.resources import files

    return sorted(p.name.removesuffix(".yaml") for p in files(RECIPES_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(spec: str | Path) -> Path:
    """A config file path as given, or the shipped recipe of that name (``demo`` -> .../configs/demo.yaml)."""
    path = Path(spec)
    if path.is_file():
        return path
    from importlib.resources import files

    recipe = files(RECIPES_PACKAGE) / f"{spec}.yaml"
    if recipe.is_file():
        return Path(str(recipe))
    raise ConfigError(
        f"config {str(spec)!r} is neither a file nor a shipped recipe; recipes: {recipe_names()}, "
        "or pass the path of a YAML file"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config or shipped recipe (or start from defaults), apply dotted overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        values = loaded or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(values, key, value)
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``load_config`` reads back to an equal config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def validate(config: Config) -> None:
    """Cross-field checks that the type system cannot express."""
    train = config.train
    if train.steps <= 0:
        raise ConfigError(f"train.steps={train.steps} must be positive")
    if train.batch_size < 2:
        raise ConfigError(f"train.batch_size={train.batch_size}: a contrastive batch needs at least 2 pairs")
    if train.accumulation_steps < 1 or train.batch_size % train.accumulation_steps:
        raise ConfigError(
            f"train.batch_size={train.batch_size} must split evenly into "
            f"train.accumulation_steps={train.accumulation_steps} micro-batches"
        )
    _validate_data(config.data, "data")
    image = config.model.image
    if image.kind in ("torchvision", "timm") and not image.name:
        raise ConfigError(f"model.image.kind={image.kind!r} needs model.image.name, e.g. resnet18")
    if image.kind == "vit":
        if image.image_size % image.patch_size:
            raise ConfigError(
                f"model.image.image_size={image.image_size} must be a multiple of "
                f"model.image.patch_size={image.patch_size}"
            )
        if image.width % image.heads:
            raise ConfigError(f"model.image.width={image.width} must be divisible by model.image.heads={image.heads}")
    if bool(image.mean) != bool(image.std) or len(image.mean) not in (0, 3) or len(image.std) not in (0, 3):
        raise ConfigError("model.image.mean and model.image.std must both be empty or both hold 3 numbers")
    text = config.model.text
    if text.kind == "hf" and not text.name:
        raise ConfigError("model.text.kind='hf' needs model.text.name: a Hugging Face model id or local folder")
    if text.kind == "transformer":
        if text.width % text.heads:
            raise ConfigError(f"model.text.width={text.width} must be divisible by model.text.heads={text.heads}")
        if text.tokenizer.kind == "hf" and not text.tokenizer.name:
            raise ConfigError(
                "model.text.tokenizer.kind='hf' with the built-in text tower needs model.text.tokenizer.name"
            )
    if config.loss.chunk_size is not None and config.loss.chunk_size <= 0:
        raise ConfigError(f"loss.chunk_size={config.loss.chunk_size} must be positive (or null for no chunking)")


_PATH_NEEDED = {
    "manifest": "the CSV/TSV/JSONL file of image,caption rows",
    "coco": "the path to captions_*.json",
    "flickr": "the Karpathy dataset_*.json, Flickr8k.token.txt or captions.txt file",
    "imagefolder": "the root folder holding one sub-folder per class",
    "webdataset": "the shard list, e.g. data/{00000..00123}.tar",
    "hf": "a datasets folder (save_to_disk) or Parquet/Arrow files",
    "idx": "the *-images-idx3-ubyte[.gz] file",
    "cifar": "the cifar-10-batches-py or cifar-100-python folder",
}


def _validate_data(data: DataConfig, prefix: str) -> None:
    if data.kind in _PATH_NEEDED and not data.path:
        raise ConfigError(f"{prefix}.kind={data.kind!r} needs {prefix}.path: {_PATH_NEEDED[data.kind]}")
    if data.kind == "mix":
        if not data.mix:
            raise ConfigError(f"{prefix}.kind='mix' needs {prefix}.mix: a list of sources, each with a weight")
        for position, entry in enumerate(data.mix):
            if entry.kind == "mix":
                raise ConfigError(f"{prefix}.mix[{position}]: a mix cannot contain another mix")
            if entry.weight <= 0:
                raise ConfigError(f"{prefix}.mix[{position}].weight={entry.weight} must be positive")
            _validate_data(entry, f"{prefix}.mix[{position}]")
