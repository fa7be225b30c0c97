"""Heat maps of where a text matches an image: attention rollout for the built-in ViT, Grad-CAM for CNNs."""

from clipforge.explain.heatmap import Explanation, explain

__all__ = ["Explanation", "explain"]
