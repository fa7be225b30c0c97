"""Projection heads: map a tower's features (B, in_dim) into the shared embedding space (B, out_dim)."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import ConfigError

HEAD_KINDS = ("linear", "mlp", "identity")


class LinearHead(nn.Module):
    """y = W x, no bias: the CLIP paper's linear projection into the joint space; y = W x + b with ``bias``
    (SigLIP's text head), b starting at 0.

    ``init="normal"``: W ~ normal(0, in_dim^-1/2); ``"identity"``: W = I (in_dim == out_dim), a head that starts
    as the tower's own space (a pretrained text tower's) and moves only as far as training takes it.
    """

    def __init__(self, in_dim: int, out_dim: int, init: str = "normal", bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        if bias:
            nn.init.zeros_(self.proj.bias)
        if init == "identity":
            if in_dim != out_dim:
                raise ValueError(f"an identity-initialised head needs in_dim == out_dim, got {in_dim} -> {out_dim}")
            nn.init.eye_(self.proj.weight)
        elif init == "normal":
            # std in_dim^-1/2 keeps the projected norm close to the feature norm, as in CLIP
            nn.init.normal_(self.proj.weight, std=in_dim**-0.5)
        else:
            raise ValueError(f"head init={init!r} is unknown; choose 'normal' or 'identity'")

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


def build_head(
    kind: str,
    in_dim: int,
    out_dim: int,
    dropout: float = 0.1,
    where: str = "model",
    init: str = "normal",
    bias: bool = False,
) -> nn.Module:
    """``linear`` -> :class:`LinearHead` (``init``: ``normal`` | ``identity``; ``bias``); ``mlp`` -> :class:`MLPHead`
    (``dropout`` applies to ``mlp`` only); ``identity`` -> y = x, which keeps a pretrained tower's own space (LiT's
    locked text tower: the other head learns to map into it); it needs ``in_dim == out_dim``.
    ``where`` names the config section in errors, which are ``ConfigError``s: a user's setting, not a bug."""
    if init == "identity" and kind != "linear":
        raise ConfigError(
            f"{where}.head_init='identity' starts a 'linear' head at the identity; {where}.head={kind!r} has no "
            f"such start: set {where}.head_init=normal, or {where}.head=linear"
        )
    if init == "identity" and in_dim != out_dim:
        raise ConfigError(
            f"{where}.head_init='identity' needs model.embed_dim equal to the tower's {in_dim}-d features "
            f"(it is {out_dim})"
        )
    if bias and kind != "linear":
        raise ConfigError(f"{where}.head_bias=true needs {where}.head='linear' (it is {kind!r})")
    if kind == "linear":
        return LinearHead(in_dim, out_dim, init, bias)
    if kind == "mlp":
        return MLPHead(in_dim, out_dim, dropout)
    if kind == "identity":
        if in_dim != out_dim:
            raise ConfigError(
                f"{where}.head='identity' keeps the tower's {in_dim}-d features, so model.embed_dim must be "
                f"{in_dim} (it is {out_dim}); or use head 'linear'"
            )
        return nn.Identity()
    raise ConfigError(f"projection head kind={kind!r} is unknown; choose one of {list(HEAD_KINDS)}")
