"""clipforge: train, evaluate, search with and explain CLIP-style image-text models."""

__version__ = "0.1.0"
