"""Typed settings for every stage, loaded from YAML and overridden with dotted keys.

A config is a tree of dataclasses (``schema``). ``load_config("configs/demo.yaml", ["train.batch_size=64"])``
reads the YAML (``parsing``; a shipped recipe name works too: ``recipes``), applies the overrides, converts and
checks every key and value against the dataclass fields (``convert``) and runs the cross-field checks
(``validation``), all *before anything runs*: an unknown key names the allowed keys, a wrong type names the
expected type, a choice field (``Literal``) names its allowed values.
"""

from clipforge.config.convert import config_to_dict
from clipforge.config.errors import CheckpointError, ConfigError
from clipforge.config.parsing import (
    config_from_dict,
    data_config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)
from clipforge.config.recipes import recipe_names, resolve_config_path
from clipforge.config.schema import (
    BUILTIN_VIT_IMAGE_SIZE,
    DATA_KINDS,
    EVAL_METRICS,
    RETRIEVAL_METRICS,
    ZEROSHOT_METRICS,
    AugmentConfig,
    Config,
    DataConfig,
    DataKindInfo,
    DistributedConfig,
    EvalConfig,
    EvalTaskConfig,
    ImageTowerConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TextTowerConfig,
    TokenizerConfig,
    TrainConfig,
)
from clipforge.config.validation import LOCK_PATTERN, validate

__all__ = [
    "BUILTIN_VIT_IMAGE_SIZE",
    "DATA_KINDS",
    "EVAL_METRICS",
    "LOCK_PATTERN",
    "RETRIEVAL_METRICS",
    "ZEROSHOT_METRICS",
    "AugmentConfig",
    "Config",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataKindInfo",
    "DistributedConfig",
    "EvalConfig",
    "EvalTaskConfig",
    "ImageTowerConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TextTowerConfig",
    "TokenizerConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "data_config_from_dict",
    "load_config",
    "parse_overrides",
    "recipe_names",
    "resolve_config_path",
    "save_config",
    "validate",
]
