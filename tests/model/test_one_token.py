"""The last block of a tower that pools one token runs for that token alone, with the full pass's result."""

from __future__ import annotations

import pytest
import torch

from clipforge.model.text import TextTransformer, pool_tokens
from clipforge.model.transformer import Transformer
from clipforge.model.vision import VisionTransformer


@pytest.mark.parametrize("is_causal", [False, True])
def test_one_token_of_the_last_block_equals_that_row_of_the_full_pass(is_causal: bool) -> None:
    torch.manual_seed(0)
    transformer = Transformer(width=32, depth=3, heads=4).double()
    x = torch.randn(5, 9, 32, dtype=torch.double, requires_grad=True)
    rows = torch.tensor([0, 8, 3, 3, 5])
    full = transformer(x, is_causal=is_causal)[torch.arange(5), rows]
    one = transformer.forward_one_token(x, rows, is_causal=is_causal)
    torch.testing.assert_close(one, full, atol=1e-12, rtol=1e-10)
    # the gradients too, of the input and of every parameter (the last block's query, MLP and output included)
    weights = torch.randn_like(full)
    full_grads = torch.autograd.grad((full * weights).sum(), [x, *transformer.parameters()])
    one_grads = torch.autograd.grad((one * weights).sum(), [x, *transformer.parameters()])
    for expected, got in zip(full_grads, one_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def full_text_features(tower: TextTransformer, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: every position through every block, then pool_tokens."""
    hidden = tower.token_embedding(ids) + tower.positional_embedding[: ids.shape[1]]
    hidden = tower.ln_final(tower.transformer(hidden, is_causal=tower.causal))
    return pool_tokens(hidden, mask, tower.pooling, ids, tower.eos_token_id)


@pytest.mark.parametrize(
    ("pooling", "causal"), [("eot", True), ("argmax", True), ("eos", True), ("cls", False), ("last", False)]
)
def test_text_tower_pooling_one_token_matches_the_full_pass(pooling: str, causal: bool) -> None:
    torch.manual_seed(0)
    tower = TextTransformer(50, 12, 32, 2, 4, pooling=pooling, causal=causal, eos_token_id=49).double().eval()
    lengths = torch.tensor([12, 3, 7, 1])
    mask = (torch.arange(12) < lengths[:, None]).long()
    ids = torch.randint(1, 49, (4, 12)) * mask
    ids[torch.arange(4), lengths - 1] = 49  # an end-of-text id (the largest) at each text's end
    torch.testing.assert_close(tower(ids, mask), full_text_features(tower, ids, mask), atol=1e-12, rtol=1e-10)
    features, attentions = tower(ids, mask, return_attention=True)  # explanations keep the full pass
    assert len(attentions) == 2 and attentions[0].shape == (4, 4, 12, 12)
    # that pass takes its softmax in float32 (explicit_attention), hence the float32 tolerance
    torch.testing.assert_close(features, tower(ids, mask), atol=1e-6, rtol=1e-5)


def test_vit_class_token_one_token_matches_the_full_pass() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, depth=2, heads=4).double().eval()
    images = torch.randn(3, 3, 32, 32, dtype=torch.double)
    features, _ = vit(images, return_attention=True)  # the full pass (explanations need every position)
    torch.testing.assert_close(vit(images), features, atol=1e-6, rtol=1e-5)  # float32 softmax in that pass
    tokens = vit.patch_embed(images).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.class_embedding.expand(3, 1, -1), tokens], dim=1) + vit.positional_embedding
    reference = vit.ln_post(vit.transformer(vit.ln_pre(tokens))[:, 0])  # every position through every block
    torch.testing.assert_close(vit(images), reference, atol=1e-12, rtol=1e-10)


@pytest.fixture
def onednn_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN path, whatever this machine's probe chose (its own tests below check both choices)."""
    from clipforge.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_onednn_faster", lambda: True)


@pytest.mark.usefixtures("onednn_chosen")
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_fused_linear_equals_linear_then_activation_and_only_runs_in_cpu_float32_inference(activation) -> None:
    from clipforge.model.cpu_kernels import fused_linear
    from clipforge.model.transformer import build_activation

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 96)
    x = torch.randn(3, 7, 48)
    reference = layer(x) if activation is None else build_activation(activation)(layer(x))
    with torch.inference_mode():
        fused = fused_linear(x, layer.weight, layer.bias, activation)
    if fused is None:
        pytest.skip("this torch build has no oneDNN linear: the plain path runs")
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    assert fused_linear(x, layer.weight, layer.bias, activation) is None  # autograd on: the plain path
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_linear(x, layer.weight, layer.bias, activation) is None  # autocast decides the dtype
    with torch.inference_mode():
        assert fused_linear(x.double(), layer.weight.double(), layer.bias.double(), activation) is None
        assert fused_linear(x, layer.weight, layer.bias, "quick_gelu") is None  # no oneDNN form


@pytest.mark.usefixtures("onednn_chosen")
def test_built_in_blocks_give_the_same_embeddings_in_inference_as_with_autograd() -> None:
    """Inference goes through oneDNN's fused linears, training through torch's: the same function."""
    torch.manual_seed(0)
    for act in ("gelu", "gelu_tanh", "quick_gelu"):
        transformer = Transformer(width=32, depth=2, heads=4, act=act)
        x = torch.randn(4, 9, 32)
        with torch.no_grad():
            plain = transformer(x.requires_grad_())  # no_grad: fused path; compare with autograd below
        trained = transformer(x.detach().requires_grad_())
        torch.testing.assert_close(plain, trained.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("onednn_chosen")
def test_onednn_linear_gradients_equal_torch_linear() -> None:
    """cpu_kernels.linear in training: the same output and gradients (input, weight, bias) as F.linear."""
    from clipforge.model.cpu_kernels import linear

    torch.manual_seed(0)
    weight = torch.randn(24, 16, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    upstream = torch.randn(3, 5, 24)
    results = []
    for function in (linear, torch.nn.functional.linear):
        out = function(x, weight, bias)
        grads = torch.autograd.grad((out * upstream).sum(), [x, weight, bias])
        results.append((out, *grads))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    frozen = linear(x, weight.detach(), None)  # a locked layer: only the input's gradient
    (input_grad,) = torch.autograd.grad((frozen * upstream).sum(), [x])
    torch.testing.assert_close(input_grad, upstream @ weight.detach(), atol=1e-5, rtol=1e-5)


def test_where_the_probe_finds_torch_faster_every_linear_is_torch_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipforge.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_onednn_faster", lambda: False)
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24)
    x = torch.randn(3, 16)
    assert torch.equal(
        cpu_kernels.linear(x, layer.weight, layer.bias), torch.nn.functional.linear(x, layer.weight, layer.bias)
    )
    with torch.inference_mode():
        assert cpu_kernels.fused_linear(x, layer.weight, layer.bias, "gelu") is None


def test_the_kernel_probe_measures_a_finite_positive_ratio() -> None:
    import math

    from clipforge.model.cpu_kernels import measure_onednn_linear_speedup

    speedup = measure_onednn_linear_speedup(tokens=32, width=32, rounds=1)
    assert math.isfinite(speedup) and speedup > 0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
def test_a_process_whose_first_linear_runs_without_autograd_still_measures_the_probe(
    mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The kernel probe times a backward pass; the first linear of an embed or eval process runs under
    no_grad / inference_mode (or autocast), and must measure it there, not fail (found by a fresh machine's run)."""
    import functools

    from clipforge.model import cpu_kernels
    from clipforge.runtime import probes

    monkeypatch.setenv("CLIPFORGE_CACHE_DIR", str(tmp_path))  # an empty probe file: measured on the first linear
    small = functools.partial(cpu_kernels.measure_onednn_linear_speedup, tokens=64, width=32, rounds=1)
    monkeypatch.setattr(cpu_kernels, "measure_onednn_linear_speedup", small)
    cpu_kernels._onednn_faster.cache_clear()
    probes.measured_once.cache_clear()
    tower = VisionTransformer(image_size=32, patch_size=8, width=32, depth=2, heads=2).eval()
    contexts = {
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
        "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
    }
    try:
        with contexts[mode]:
            features = tower(torch.randn(2, 3, 32, 32))
            if mode == "autocast":  # the float32 kernel does not apply under autocast: ask for the choice there
                assert cpu_kernels._onednn_faster() in (True, False)
        assert torch.isfinite(features.float()).all()
        assert "onednn_linear_speedup" in (tmp_path / "machine-probes.json").read_text()  # kept for the next process
    finally:
        cpu_kernels._onednn_faster.cache_clear()
        probes.measured_once.cache_clear()
