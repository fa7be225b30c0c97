"""clipforge: train, evaluate, search with and explain CLIP-style image-text models.

The public API: load a model with its processor (``from_pretrained`` / ``load_checkpoint`` take a checkpoint or
Hugging Face / open_clip weights), build a new one (``create_model``), read a config (``load_config``).

The names are imported when first used, so ``import clipforge`` (and the command line) stays fast and loads
PyTorch only when a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clipforge.version import __version__

if TYPE_CHECKING:
    from clipforge.config import Config, load_config
    from clipforge.data.processor import Processor
    from clipforge.data.tokenize import Tokenizer, build_tokenizer
    from clipforge.interop.load import from_pretrained, load_checkpoint
    from clipforge.model import CLIPModel, create_model
    from clipforge.model.factory import LoadedModel

# public name -> the module that defines it
_PUBLIC = {
    "CLIPModel": "clipforge.model",
    "Config": "clipforge.config",
    "LoadedModel": "clipforge.model.factory",
    "Processor": "clipforge.data.processor",
    "Tokenizer": "clipforge.data.tokenize",
    "build_tokenizer": "clipforge.data.tokenize",
    "create_model": "clipforge.model",
    "from_pretrained": "clipforge.interop.load",
    "load_checkpoint": "clipforge.interop.load",
    "load_config": "clipforge.config",
}

__all__ = [
    "CLIPModel",
    "Config",
    "LoadedModel",
    "Processor",
    "Tokenizer",
    "__version__",
    "build_tokenizer",
    "create_model",
    "from_pretrained",
    "load_checkpoint",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value
