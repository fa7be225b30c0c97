"""GradCache: one optimizer step over 4 micro-batches equals the full-batch step, in memory of one micro-batch."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from clipforge.data.samples import Batch
from clipforge.losses import build_loss
from clipforge.model import create_model
from clipforge.train.gradcache import backward_step
from clipforge.train.memory import TensorMemoryTracker
from clipforge.train.optim import build_optimizer
from tests.conftest import tiny_config

VOCAB = 60


def random_batch(size: int, length: int = 12, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (size,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (size, length), generator=generator) * mask
    return Batch(torch.randn(size, 3, 32, 32, generator=generator), input_ids, mask)


def tiny_model(loss_kind: str, text_head_dropout: float = 0.0):
    config = tiny_config(Path("-"), Path("-"), loss={"kind": loss_kind})
    config.model.text.head, config.model.text.head_dropout = "mlp", text_head_dropout
    torch.manual_seed(0)
    return config, create_model(config.model, loss_kind=loss_kind, vocab_size=VOCAB).train()


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_gradcache_optimizer_step_equals_full_batch_step(loss_kind: str) -> None:
    batch = random_batch(16)
    weights = []
    for accumulation_steps in (1, 4):
        config, model = tiny_model(loss_kind, text_head_dropout=0.3)  # dropout: the replays must redraw its masks
        optimizer = build_optimizer(model, config.optim, torch.device("cpu"), config.model)
        torch.manual_seed(1)
        backward_step(model, build_loss(config.loss), batch, accumulation_steps, contextlib.nullcontext(), None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        weights.append({name: value.clone() for name, value in model.state_dict().items()})
    full, cached = weights
    initial = tiny_model(loss_kind)[1].state_dict()
    assert any(not torch.equal(value, initial[name]) for name, value in full.items())
    for name, value in full.items():
        assert torch.allclose(value, cached[name], atol=1e-5), name


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_gradcache_gives_the_temperature_its_full_batch_gradient_or_none_when_frozen(loss_kind: str) -> None:
    """Step 1 computes t = exp(log_logit_scale) under no_grad, so only the replay can tell whether the parameter
    trains: d loss / d log t must still reach it (and equal the full batch's), and a frozen one must get none."""
    batch = random_batch(16)
    for frozen in (False, True):
        gradients = []
        for accumulation_steps in (1, 4):
            config, model = tiny_model(loss_kind)
            model.log_logit_scale.requires_grad_(not frozen)
            backward_step(model, build_loss(config.loss), batch, accumulation_steps, contextlib.nullcontext(), None)
            gradients.append({name: p.grad for name, p in model.named_parameters()})
        full, cached = gradients
        if frozen:
            assert full["log_logit_scale"] is None and cached["log_logit_scale"] is None
        else:
            assert cached["log_logit_scale"] is not None and cached["log_logit_scale"].abs() > 0
            assert torch.allclose(cached["log_logit_scale"], full["log_logit_scale"], rtol=1e-4, atol=1e-7)
        if loss_kind == "siglip":
            assert torch.allclose(cached["logit_bias"], full["logit_bias"], rtol=1e-4, atol=1e-7)
        assert torch.allclose(cached["image_head.proj.weight"], full["image_head.proj.weight"], atol=1e-6)


def peak_step_memory(batch_size: int, accumulation_steps: int) -> int:
    config, model = tiny_model("clip")
    batch = random_batch(batch_size)
    loss_fn = build_loss(config.loss)
    backward_step(model, loss_fn, batch, accumulation_steps, contextlib.nullcontext(), None)  # gradients exist now
    with TensorMemoryTracker() as tracker:
        backward_step(model, loss_fn, batch, accumulation_steps, contextlib.nullcontext(), None)
    return tracker.peak


def test_gradcache_memory_follows_the_micro_batch_not_the_batch() -> None:
    plain_small, plain_large = peak_step_memory(16, 1), peak_step_memory(64, 1)
    cached_small, cached_large = peak_step_memory(16, 4), peak_step_memory(64, 16)  # micro-batches of 4 in both
    assert plain_large > 3 * plain_small, (plain_small, plain_large)
    assert cached_large < 1.3 * cached_small, (cached_small, cached_large)
    assert cached_large < plain_large / 5, (cached_large, plain_large)
