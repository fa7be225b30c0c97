"""Attention: the fused SDPA path, the explicit-weights path and a plain per-head loop agree."""

import math

import pytest
import torch

from clipforge.model.transformer import MultiheadSelfAttention, Transformer, causal_mask

WIDTH, HEADS, LENGTH, BATCH = 32, 4, 7, 2


def reference_attention(attention: MultiheadSelfAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Plain loop over batch and heads; ``allowed`` (T, T) bool says which keys each query may see."""
    head_dim = WIDTH // HEADS
    q, k, v = attention.qkv(x).split(WIDTH, dim=-1)
    outputs = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for h in range(HEADS):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(head_dim)
            scores = scores.masked_fill(~allowed, float("-inf"))
            outputs[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols]
    return attention.out_proj(outputs)


@pytest.fixture
def attention():
    torch.manual_seed(0)
    return MultiheadSelfAttention(WIDTH, HEADS)


def _random_bool_mask() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(LENGTH, LENGTH, generator=generator) > 0.4
    return mask | torch.eye(LENGTH, dtype=torch.bool)  # every query keeps at least itself


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive", "causal+bool"])
def test_sdpa_explicit_and_reference_agree(attention, mask_kind):
    x = torch.randn(BATCH, LENGTH, WIDTH)
    allowed = torch.ones(LENGTH, LENGTH, dtype=torch.bool)
    attn_mask, is_causal = None, False
    if "causal" in mask_kind:
        is_causal = True
        allowed = allowed & causal_mask(LENGTH)
    if "bool" in mask_kind:
        attn_mask = _random_bool_mask()
        allowed = allowed & attn_mask
    if mask_kind == "additive":
        attn_mask = torch.zeros(LENGTH, LENGTH).masked_fill(~_random_bool_mask(), float("-inf"))
        allowed = _random_bool_mask()

    fused, no_weights = attention(x, attn_mask=attn_mask, is_causal=is_causal)
    explicit, weights = attention(x, attn_mask=attn_mask, is_causal=is_causal, need_weights=True)
    expected = reference_attention(attention, x, allowed)

    assert no_weights is None
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
    assert weights.shape == (BATCH, HEADS, LENGTH, LENGTH)
    torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, HEADS, LENGTH))
    assert torch.all(weights[..., ~allowed] == 0)


def test_transformer_returns_per_layer_attention_and_same_output():
    torch.manual_seed(0)
    transformer = Transformer(WIDTH, depth=2, heads=HEADS, mlp_ratio=2.0)
    x = torch.randn(BATCH, LENGTH, WIDTH)
    plain = transformer(x)
    with_weights, attentions = transformer(x, return_attention=True)
    torch.testing.assert_close(plain, with_weights, atol=1e-5, rtol=1e-5)
    assert len(attentions) == 2
    for weights in attentions:
        assert weights.shape == (BATCH, HEADS, LENGTH, LENGTH)
        torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, HEADS, LENGTH))


def test_causal_transformer_hides_later_positions():
    torch.manual_seed(0)
    transformer = Transformer(WIDTH, depth=2, heads=HEADS)
    x = torch.randn(1, LENGTH, WIDTH)
    changed = x.clone()
    changed[:, 4] = 10 * torch.randn(WIDTH)
    before, after = transformer(x, is_causal=True), transformer(changed, is_causal=True)
    torch.testing.assert_close(before[:, :4], after[:, :4], atol=1e-6, rtol=0)
    assert (before[:, 4:] - after[:, 4:]).abs().amax() > 1e-2
    # without the causal mask the change does reach earlier positions
    assert (transformer(x)[:, :4] - transformer(changed)[:, :4]).abs().amax() > 1e-4


def test_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadSelfAttention(30, 4)
