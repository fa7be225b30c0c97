"""clipforge: train, evaluate, search with and explain CLIP-style image-text models.

The public API: build or load a model, its tokenizer and its image transform.
"""

__version__ = "0.1.0"

from clipforge.config import Config, load_config  # noqa: E402
from clipforge.data.tokenize import Tokenizer, build_tokenizer  # noqa: E402
from clipforge.data.transforms import build_image_transform  # noqa: E402
from clipforge.model import CLIPModel, create_model, resolve_image_preprocess  # noqa: E402
from clipforge.train.checkpoint import LoadedCheckpoint, load_checkpoint  # noqa: E402

__all__ = [
    "CLIPModel",
    "Config",
    "LoadedCheckpoint",
    "Tokenizer",
    "build_image_transform",
    "build_tokenizer",
    "create_model",
    "load_checkpoint",
    "load_config",
    "resolve_image_preprocess",
]
