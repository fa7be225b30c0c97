"""Gradient checkpointing: the same gradients, less activation memory; unsupported towers are reported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from clipforge.config import TrainConfig
from clipforge.distributed import DistributedContext
from clipforge.distributed.wrap import compile_towers, prepare_model
from clipforge.model import create_model
from clipforge.model.grad_checkpointing import enable_grad_checkpointing
from clipforge.train.memory import TensorMemoryTracker
from tests.conftest import tiny_config, write_tiny_bert

VOCAB = 16  # the tiny BERT's vocabulary size: every tower takes the same ids


def inputs(batch: int = 6, length: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(5, VOCAB, (batch, length), generator=generator) * mask
    return torch.randn(batch, 3, 32, 32, generator=generator), ids, mask


def model_with(**model_sections):
    config = tiny_config(Path("-"), Path("-"), model=model_sections).model if model_sections else None
    config = config or tiny_config(Path("-"), Path("-")).model
    torch.manual_seed(0)
    return create_model(config, vocab_size=VOCAB).train()


def gradients_and_peak(model) -> tuple[dict[str, torch.Tensor], int]:
    images, ids, mask = inputs()
    with TensorMemoryTracker() as tracker:
        output = model(images, ids, mask)
        (output.image_embeds @ output.text_embeds.T).pow(2).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, tracker.peak


def assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name, grad in expected.items():
        assert torch.allclose(grad, actual[name], atol=1e-6), name


# four blocks a tower: the last block of a tower that pools one token runs for that token alone (no activations
# worth recomputing), so memory is saved in the blocks before it
DEEP = {
    "image": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 48, "depth": 4, "heads": 2},
    "text": {
        "kind": "transformer",
        "width": 48,
        "depth": 4,
        "heads": 2,
        "context_length": 16,
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
    },
}


def test_builtin_towers_same_gradients_less_memory() -> None:
    plain, plain_peak = gradients_and_peak(model_with(**DEEP))
    model = model_with(**DEEP)
    assert enable_grad_checkpointing(model) == []
    assert model.image_tower.transformer.grad_checkpointing and model.text_tower.transformer.grad_checkpointing
    checkpointed, checkpointed_peak = gradients_and_peak(model)
    assert_same(plain, checkpointed)
    assert checkpointed_peak < 0.8 * plain_peak, (checkpointed_peak, plain_peak)


def test_timm_and_hugging_face_towers(tmp_path: Path) -> None:
    bert = str(write_tiny_bert(tmp_path / "bert"))
    sections = {
        "image": {"kind": "timm", "name": "test_vit", "image_size": 32},
        "text": {"kind": "hf", "name": bert, "context_length": 16, "tokenizer": {"kind": "hf"}},
    }
    plain, _ = gradients_and_peak(model_with(**sections))
    model = model_with(**sections)
    assert enable_grad_checkpointing(model) == []
    assert model.image_tower.backbone.grad_checkpointing
    encoder = model.text_tower.encoder
    assert getattr(encoder, "is_activation_checkpointing", None) or encoder.is_gradient_checkpointing
    checkpointed, _ = gradients_and_peak(model)
    assert_same(plain, checkpointed)


def test_unsupported_tower_is_reported_and_runs_without(caplog: pytest.LogCaptureFixture) -> None:
    model = model_with(image={"kind": "torchvision", "name": "resnet18", "image_size": 32})
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        prepare_model(model, TrainConfig(gradient_checkpointing=True), DistributedContext())
    assert "image tower (ResNet) has no checkpointing support" in caplog.text
    assert model.text_tower.transformer.grad_checkpointing


def test_compiled_towers_keep_names_and_results() -> None:
    plain, compiled = model_with(), model_with()
    compile_towers(compiled, backend="eager")  # dynamo's graph capture, without inductor's slow C++ build
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints are unchanged
    assert compiled.image_tower._compiled_call_impl is not None
    expected, _ = gradients_and_peak(plain)
    actual, _ = gradients_and_peak(compiled)
    assert_same(expected, actual)
