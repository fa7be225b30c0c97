"""Pre-LN transformer blocks shared by the built-in image (ViT) and text towers.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` so GPUs get the fused
(flash / memory-efficient) kernels. Those kernels never materialise the attention matrix, so when a caller
asks for the weights (attention rollout, tests) a second, explicit path computes

    weights = softmax(Q K^T / sqrt(head_dim) + mask),   out = weights V

with exactly the same mask; both paths give the same output up to float rounding.

Mask convention (the same as SDPA): a boolean mask is True where a query *may* attend to a key; a float
mask is added to the scores (0 = keep, -inf = block). Masks broadcast to (batch, heads, T, T).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.model.cpu_kernels import apply_linear, fused_linear, is_plain_linear, linear


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(length, length) boolean mask, True on and below the diagonal: position i sees positions <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def _merge_causal(attn_mask: torch.Tensor | None, is_causal: bool, length: int, device: torch.device):
    """Fold ``is_causal`` into ``attn_mask`` when both are given (SDPA refuses the pair)."""
    if not is_causal:
        return attn_mask
    causal = causal_mask(length, device)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


def explicit_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention that also returns the weights.

    query/key/value: (batch, heads, T, head_dim). Returns (output (batch, heads, T, head_dim),
    weights (batch, heads, T, T)) with weights = softmax(Q K^T / sqrt(head_dim) + mask) over the last axis.
    """
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])  # (B, heads, T, T)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # softmax in float32: half-precision exp over long rows loses the small weights rollout multiplies
    weights = scores.float().softmax(dim=-1).to(query.dtype)
    return weights @ value, weights


class MultiheadSelfAttention(nn.Module):
    """Self-attention with one fused QKV projection (one matmul instead of three)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width={width} must be divisible by heads={heads}")
        self.width = width
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch, T, width) -> (output (batch, T, width), weights (batch, heads, T, T) or None).

        The weights are computed (explicitly, without the fused kernel) only when ``need_weights``.
        """
        batch, length, _ = x.shape
        qkv = apply_linear(x, self.qkv).view(batch, length, 3, self.heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        weights = None
        if need_weights:
            mask = _merge_causal(attn_mask, is_causal, length, x.device)
            out, weights = explicit_attention(query, key, value, mask)
        elif is_causal and attn_mask is not None:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=_merge_causal(attn_mask, True, length, x.device)
            )
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, length, self.width)
        return apply_linear(out, self.out_proj), weights

    def forward_one_query(self, x: torch.Tensor, rows: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """The attention output of one position per row only: x (B, T, width), rows (B,) positions -> (B, width).

        Keys and values come from every position, the query from position ``rows[b]`` alone; with ``is_causal``
        that query sees the keys at positions <= ``rows[b]``, as in the full causal pass. The result equals
        ``forward(x, is_causal=is_causal)[0][arange(B), rows]`` up to float rounding, for 1/T of the query and
        output work (the last block of a tower that pools one token needs no more).
        """
        batch, length, width = x.shape
        picked = x[torch.arange(batch, device=x.device), rows]  # (B, width)
        if is_plain_linear(self.qkv):
            query_weight, key_value_weight = self.qkv.weight.split([width, 2 * width])
            query_bias, key_value_bias = self.qkv.bias.split([width, 2 * width])
            query = linear(picked, query_weight, query_bias)
            key_value = linear(x, key_value_weight, key_value_bias)
        else:  # an adapted projection (LoRA) is one map: run it whole, keep the picked rows' queries
            qkv = self.qkv(x)  # (B, T, 3 * width)
            query, key_value = qkv[torch.arange(batch, device=x.device), rows, :width], qkv[..., width:]
        query = query.reshape(batch, self.heads, 1, self.head_dim)
        key_value = key_value.reshape(batch, length, 2, self.heads, self.head_dim)
        key, value = key_value.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        mask = None
        if is_causal:  # (B, 1, 1, T): True where the key's position is at most the query's
            mask = (torch.arange(length, device=x.device) <= rows[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (B, heads, 1, head_dim)
        return apply_linear(out.reshape(batch, width), self.out_proj)


# the activations the blocks offer, by config name: GELU (exact, erf), CLIP's sigmoid approximation of it, and
# the tanh approximation SigLIP was trained with
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")
DEFAULT_NORM_EPS = 1e-5  # torch's LayerNorm default, and CLIP's


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained CLIP with (its released weights expect it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def build_activation(name: str) -> nn.Module:
    """``gelu`` -> GELU(x) = x * Phi(x); ``quick_gelu`` -> :class:`QuickGELU`; ``gelu_tanh`` -> GELU's tanh
    approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation {name!r} is unknown; choose one of {list(ACTIVATIONS)}")


class MLP(nn.Module):
    """Linear(width, hidden) -> activation -> Linear(hidden, width), hidden = round(width * mlp_ratio)."""

    def __init__(self, width: int, mlp_ratio: float = 4.0, act: str = "gelu") -> None:
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.fc1 = nn.Linear(width, hidden)
        self.act = build_activation(act)
        self.act_name = act
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in inference on the CPU, fc1's bias and GELU fuse into one oneDNN kernel (fused_linear: None where it
        # does not apply, QuickGELU included); elsewhere apply_linear still runs oneDNN's products where it can
        hidden = fused_linear(x, self.fc1.weight, self.fc1.bias, self.act_name) if is_plain_linear(self.fc1) else None
        if hidden is None:
            hidden = self.act(apply_linear(x, self.fc1))
        return apply_linear(hidden, self.fc2)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x = x + attn(ln1(x)); x = x + mlp(ln2(x))."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = DEFAULT_NORM_EPS
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_ratio, act)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, width) -> (x (B, T, width), attention weights or None); with ``rows`` (B,) the output at
        position ``rows[b]`` of each row only, (B, width) (:meth:`forward_one_token`). Both go through
        ``__call__``, so module hooks (FSDP2's unsharding of this block) run either way."""
        if rows is not None:
            return self.forward_one_token(x, rows, is_causal), None
        attended, weights = self.attn(self.ln1(x), attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights)
        x = x + attended
        x = x + self.mlp(self.ln2(x))
        return x, weights

    def forward_one_token(self, x: torch.Tensor, rows: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """The block's output at position ``rows[b]`` of each row only: x (B, T, width) -> (B, width), equal to
        ``forward(x, is_causal=is_causal)[0][arange(B), rows]`` up to float rounding."""
        picked = x[torch.arange(x.shape[0], device=x.device), rows]  # (B, width)
        y = picked + self.attn.forward_one_query(self.ln1(x), rows, is_causal)
        return y + self.mlp(self.ln2(y))


class Transformer(nn.Module):
    """A stack of ``depth`` pre-LN blocks of the same ``width`` (no final LayerNorm: the towers own it).

    ``grad_checkpointing = True``: while gradients are recorded, each block runs under non-reentrant
    activation checkpointing: only its input is kept, and its activations are recomputed in the backward
    pass (one extra block forward each; memory of one block's activations instead of ``depth``).
    ``act`` names the MLP activation (:data:`ACTIVATIONS`), ``norm_eps`` the LayerNorms' epsilon.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = DEFAULT_NORM_EPS,
    ) -> None:
        super().__init__()
        self.width = width
        self.depth = depth
        self.heads = heads
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act, norm_eps) for _ in range(depth)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) linear weights and zero biases, as in ViT/BERT; LayerNorms stay (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (batch, T, width) -> (batch, T, width), plus the per-layer weights (batch, heads, T, T) if asked."""
        x, attentions = self._run_blocks(self.blocks, x, attn_mask, is_causal, return_attention)
        return (x, attentions) if return_attention else x

    def _run_blocks(
        self,
        blocks: Iterable[ResidualAttentionBlock],
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        return_attention: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``blocks`` in turn over x, under checkpointing when it is on (and no weights are asked for)."""
        attentions: list[torch.Tensor] = []
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and not return_attention
        for block in blocks:
            if recompute:
                x, weights = checkpoint(block, x, attn_mask, is_causal, False, use_reentrant=False)
                continue
            x, weights = block(x, attn_mask=attn_mask, is_causal=is_causal, need_weights=return_attention)
            if return_attention:
                attentions.append(weights)
        return x, attentions

    def forward_one_token(self, x: torch.Tensor, rows: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """The last block's output at position ``rows[b]`` of each row only: x (B, T, width) -> (B, width).

        For towers that pool one token (a class token, the end-of-text token): every block but the last runs
        in full, since later positions read all of them, but only the pooled position of the last block is ever
        read, so its query, attention output and MLP run for that position alone. Equal to
        ``forward(x, is_causal=is_causal)[arange(B), rows]`` up to float rounding; on the tiny benchmark model
        it saves ~80% of one block per tower, forward and backward.
        """
        x, _ = self._run_blocks(self.blocks[:-1], x, None, is_causal, False)
        return self.blocks[-1](x, is_causal=is_causal, rows=rows)[0]  # through __call__: FSDP2's hooks


class AttentionPool(nn.Module):
    """Multihead attention pooling (SigLIP's "MAP" head): one learned probe query attends over all tokens.

    tokens (B, T, width) -> pooled = out_proj(softmax(q k^T / sqrt(head_dim)) v), q from the probe and k, v from
    the tokens -> features = pooled + mlp(norm(pooled)), (B, width). ``qkv`` holds the [q; k; v] projections
    fused as ``nn.MultiheadAttention``'s ``in_proj`` does, so released heads load as they are.
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = DEFAULT_NORM_EPS
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention pooling width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_ratio, act)
        nn.init.normal_(self.probe, std=0.02)
        for layer in (self.qkv, self.out_proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, width) -> features (B, width)."""
        batch, length, width = tokens.shape
        head_dim = width // self.heads
        query_weight, key_value_weight = self.qkv.weight.split([width, 2 * width])
        query_bias, key_value_bias = self.qkv.bias.split([width, 2 * width])
        probe = self.probe.to(tokens.dtype).expand(batch, -1, -1)  # (B, 1, width)
        query = F.linear(probe, query_weight, query_bias).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        key_value = F.linear(tokens, key_value_weight, key_value_bias).view(batch, length, 2, self.heads, head_dim)
        key, value = key_value.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        pooled = F.scaled_dot_product_attention(query, key, value)  # (B, heads, 1, head_dim)
        pooled = self.out_proj(pooled.transpose(1, 2).reshape(batch, 1, width))
        return (pooled + self.mlp(self.norm(pooled)))[:, 0]
