"""The layout fields released CLIP/SigLIP models need (activation, LayerNorm eps, ln_pre, attention pooling, patch
bias, bidirectional text, pooling rules, head bias, embedding rows, padding), each against a plain reference; the
defaults keep today's layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clipforge.config import ConfigError, ModelConfig, config_from_dict
from clipforge.data.tokenize import Tokenizer, train_bpe_tokenizer
from clipforge.model import create_model
from clipforge.model.heads import build_head
from clipforge.model.text import TextTransformer, pool_tokens
from clipforge.model.transformer import AttentionPool, build_activation
from clipforge.model.vision import VisionTransformer


def test_the_activations_follow_their_formulas() -> None:
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(build_activation("quick_gelu")(x), x * torch.sigmoid(1.702 * x))
    tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert torch.allclose(build_activation("gelu_tanh")(x), tanh, atol=1e-6)
    assert torch.allclose(build_activation("gelu")(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), atol=1e-6)
    with pytest.raises(ValueError, match="choose one of"):
        build_activation("relu")


def test_attention_pooling_equals_a_multihead_attention_reference() -> None:
    torch.manual_seed(0)
    pool = AttentionPool(width=16, heads=4, mlp_ratio=2.0, act="gelu_tanh", norm_eps=1e-6).eval()
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(pool.qkv.weight)
        reference.in_proj_bias.copy_(pool.qkv.bias)
        reference.out_proj.weight.copy_(pool.out_proj.weight)
        reference.out_proj.bias.copy_(pool.out_proj.bias)
    tokens = torch.randn(3, 5, 16)
    with torch.no_grad():
        attended = reference(pool.probe.expand(3, -1, -1), tokens, tokens, need_weights=False)[0]
        expected = (attended + pool.mlp(pool.norm(attended)))[:, 0]
        assert torch.allclose(pool(tokens), expected, atol=1e-6)


def test_pooling_rules_against_a_loop() -> None:
    hidden = torch.randn(3, 6, 4)
    ids = torch.tensor([[5, 9, 7, 2, 2, 2], [5, 7, 9, 9, 2, 0], [5, 4, 3, 3, 3, 3]])
    mask = (ids != 0).long()
    for pooling, position in (
        ("eos", lambda row: next((i for i, t in enumerate(row) if t == 7), 0)),  # first 7; a row without one: 0
        ("argmax", lambda row: row.index(max(row))),  # the first largest id
        ("last", lambda row: len(row) - 1),
    ):
        got = pool_tokens(hidden, mask, pooling, ids, eos_token_id=7)
        for row in range(3):
            assert torch.equal(got[row], hidden[row, position(ids[row].tolist())]), pooling


def test_a_bidirectional_text_tower_reads_later_tokens() -> None:
    torch.manual_seed(0)
    causal = TextTransformer(20, 6, 16, 1, 2, pooling="cls")
    both_ways = TextTransformer(20, 6, 16, 1, 2, pooling="cls", causal=False)
    both_ways.load_state_dict(causal.state_dict())
    ids = torch.tensor([[1, 2, 3, 4], [1, 5, 6, 7]])  # the same first token, different later ones
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(*causal(ids, mask).unbind(0))  # position 0 sees only itself
        assert not torch.allclose(*both_ways(ids, mask).unbind(0))


def test_siglip_layout_vit_has_no_class_token_and_pools_with_attention() -> None:
    tower = VisionTransformer(16, 8, 16, 1, 2, pre_norm=False, pool="map", patch_bias=True, act="gelu_tanh")
    names = set(tower.state_dict())
    assert "class_embedding" not in names and "ln_pre.weight" not in names and "patch_embed.bias" in names
    assert tower.positional_embedding.shape == (4, 16) and "attn_pool.probe" in names
    assert tower(torch.randn(2, 3, 16, 16)).shape == (2, 16)
    assert not tower.supports_attention_maps


def test_the_default_layout_keeps_its_parameter_names() -> None:
    tower = VisionTransformer(16, 8, 16, 1, 2)
    stem = ["class_embedding", "positional_embedding", "patch_embed.weight", "ln_pre.weight", "ln_pre.bias"]
    assert list(tower.state_dict())[:5] == stem
    assert list(tower.state_dict())[-2:] == ["ln_post.weight", "ln_post.bias"]
    assert tower.supports_attention_maps and tower.ln_post.eps == 1e-5
    assert isinstance(tower.transformer.blocks[0].mlp.act, nn.GELU)


def test_a_linear_head_with_a_bias() -> None:
    head = build_head("linear", 8, 4, bias=True)
    assert head.proj.bias is not None and torch.equal(head.proj.bias, torch.zeros(4))
    with pytest.raises(ValueError, match="head_bias=true needs model.head='linear'"):
        build_head("mlp", 8, 4, bias=True)


def test_text_vocab_size_sets_the_embedding_rows() -> None:
    config = ModelConfig(embed_dim=16)
    config.image.width, config.image.heads, config.image.depth = 16, 2, 1
    config.text.width, config.text.heads, config.text.depth, config.text.vocab_size = 16, 2, 1, 50
    assert create_model(config, vocab_size=40).text_tower.token_embedding.num_embeddings == 50
    with pytest.raises(ConfigError, match="the tokenizer has 60 tokens but model.text.vocab_size=50"):
        create_model(config, vocab_size=60)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"text": {"pooling": "eos"}}, "model.text.pooling='eos' needs model.text.eos_token_id"),
        ({"text": {"causal": False}}, "set model.text.tokenizer.padding=max_length"),
        ({"image": {"head": "mlp", "head_bias": True}}, "model.image.head_bias=true needs model.image.head='linear'"),
        ({"text": {"norm_eps": 0.0}}, "model.text.norm_eps=0.0 must be positive"),
        ({"image": {"pool": "avg"}}, "model.image.pool='avg' is not allowed"),
    ],
)
def test_layout_fields_that_do_not_fit_together_are_refused(model: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"model": model})


def test_max_length_padding_pads_to_the_context_length_and_survives_the_state() -> None:
    captions = ["a small red circle", "a large blue square"] * 4
    longest, full = train_bpe_tokenizer(captions, 300), train_bpe_tokenizer(captions, 300, padding="max_length")
    assert longest(["a"], 12)[0].shape == (1, 3) and full(["a"], 12)[0].shape == (1, 12)
    ids, mask = full(["a small red circle"], 12)
    assert mask.sum() < 12 and torch.equal(ids[mask == 0], torch.zeros(int(12 - mask.sum()), dtype=torch.long))
    assert Tokenizer.from_state_dict(full.state_dict()).padding == "max_length"
    assert "padding" not in longest.state_dict()  # states written before the option stay as they were
    assert Tokenizer.from_state_dict(longest.state_dict()).padding == "longest"


def test_bpe_ids_swap_everywhere() -> None:
    tokenizer = train_bpe_tokenizer(["a small red circle", "a large blue square"] * 4, 300)
    last = tokenizer.vocab_size - 1
    swapped = tokenizer.with_swapped_ids(2, last)
    ids, _ = tokenizer(["a small circle", "blue"], 16)
    expected = torch.where(ids == 2, last, torch.where(ids == last, 2, ids))
    assert torch.equal(swapped(["a small circle", "blue"], 16)[0], expected)
    assert swapped.eos_token_id == last and swapped.decode(expected[0].tolist()) == tokenizer.decode(ids[0].tolist())
