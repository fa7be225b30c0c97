"""Typed settings for every stage, loaded from YAML and overridden with dotted keys.

A config is a tree of dataclasses (``schema``). ``load_config("configs/demo.yaml", ["train.batch_size=64"])``
reads the YAML (``parsing``; a shipped recipe name works too: ``recipes``), applies the overrides, converts and
checks every key and value against the dataclass fields (``convert``) and runs the cross-field checks
(``validation``), all *before anything runs*: an unknown key names the allowed keys, a wrong type names the
expected type, a choice field (``Literal``) names its allowed values. The data section is one dataclass per data
kind (``data_kinds``, on the shared base in ``data_section``); ``data_upgrade`` reads the sections older versions
wrote.
"""

from clipforge.config.convert import config_to_dict
from clipforge.config.data_kinds import (
    DATA_KINDS,
    CifarData,
    CocoData,
    CorpusData,
    EmojiData,
    FlickrData,
    HFData,
    IdxData,
    ImageFolderData,
    ManifestData,
    MixData,
    TorchvisionData,
    WebDatasetData,
)
from clipforge.config.data_section import (
    LOW_RES_SIDES,
    MAP_STYLE,
    STREAMED,
    UNLABELLED,
    AugmentConfig,
    DataConfig,
    SourceCapabilities,
    register_data_kind,
)
from clipforge.config.data_upgrade import upgrade_data_section
from clipforge.config.errors import CheckpointError, ConfigError, DataError, ImageLoadError, ImageTooLargeError
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
    EVAL_METRICS,
    RETRIEVAL_METRICS,
    ZEROSHOT_METRICS,
    Config,
    DistributedConfig,
    EMAConfig,
    EvalConfig,
    EvalTaskConfig,
    ImageTowerConfig,
    LoggingConfig,
    LoraConfig,
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
    "DataError",
    "ImageLoadError",
    "ImageTooLargeError",
    "BUILTIN_VIT_IMAGE_SIZE",
    "DATA_KINDS",
    "EVAL_METRICS",
    "LOCK_PATTERN",
    "LOW_RES_SIDES",
    "MAP_STYLE",
    "RETRIEVAL_METRICS",
    "STREAMED",
    "UNLABELLED",
    "ZEROSHOT_METRICS",
    "AugmentConfig",
    "CifarData",
    "CocoData",
    "Config",
    "CheckpointError",
    "ConfigError",
    "CorpusData",
    "DataConfig",
    "DistributedConfig",
    "EMAConfig",
    "EmojiData",
    "EvalConfig",
    "EvalTaskConfig",
    "FlickrData",
    "HFData",
    "IdxData",
    "ImageFolderData",
    "ImageTowerConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ManifestData",
    "MixData",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "SourceCapabilities",
    "TextTowerConfig",
    "TokenizerConfig",
    "TorchvisionData",
    "TrainConfig",
    "WebDatasetData",
    "config_from_dict",
    "config_to_dict",
    "data_config_from_dict",
    "load_config",
    "parse_overrides",
    "recipe_names",
    "register_data_kind",
    "resolve_config_path",
    "save_config",
    "upgrade_data_section",
    "validate",
]
