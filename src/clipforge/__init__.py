"""clipforge: train, evaluate, search with and explain CLIP-style image-text models.

The public API: build or load a model (``from_pretrained`` also imports Hugging Face and open_clip weights), its
tokenizer and its image transform.
"""

from clipforge.checkpoint import LoadedCheckpoint, load_checkpoint
from clipforge.config import Config, load_config
from clipforge.data.tokenize import Tokenizer, build_tokenizer
from clipforge.data.transforms import build_image_transform
from clipforge.interop.load import from_pretrained
from clipforge.model import CLIPModel, create_model, resolve_image_preprocess
from clipforge.version import __version__

__all__ = [
    "CLIPModel",
    "Config",
    "LoadedCheckpoint",
    "Tokenizer",
    "__version__",
    "build_image_transform",
    "build_tokenizer",
    "create_model",
    "from_pretrained",
    "load_checkpoint",
    "load_config",
    "resolve_image_preprocess",
]
