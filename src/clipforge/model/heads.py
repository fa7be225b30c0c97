"""Projection heads: map a tower's features (B, in_dim) into the shared embedding space (B, out_dim)."""

from __future__ import annotations

import torch
from torch import nn

HEAD_KINDS = ("linear", "mlp")


class LinearHead(nn.Module):
    """y = W x, no bias: the CLIP paper's linear projection into the joint space."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        # std in_dim^-1/2 keeps the projected norm close to the feature norm, as in CLIP
        nn.init.normal_(self.proj.weight, std=in_dim**-0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class MLPHead(nn.Module):
    """Two-layer head with a residual and LayerNorm (the "simple CLIP" recipe):

    p = W1 x;  y = LayerNorm(p + Dropout(W2 GELU(p)))
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.projection(features)  # (B, out_dim)
        hidden = self.dropout(self.fc(self.act(projected)))
        return self.norm(hidden + projected)


def build_head(kind: str, in_dim: int, out_dim: int, dropout: float = 0.1) -> nn.Module:
    """``linear`` -> :class:`LinearHead`; ``mlp`` -> :class:`MLPHead` (``dropout`` applies to ``mlp`` only)."""
    if kind == "linear":
        return LinearHead(in_dim, out_dim)
    if kind == "mlp":
        return MLPHead(in_dim, out_dim, dropout)
    raise ValueError(f"projection head kind={kind!r} is unknown; choose one of {list(HEAD_KINDS)}")
