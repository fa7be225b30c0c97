"""train.text_buckets: a text batch run in length buckets gives the features, loss and gradients of one batch.

The reference is the same model on the whole batch (``text_buckets = 1``); generated batches (hypothesis) have any
mix of caption lengths, with rows of every length and none padded at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.checkpoint import read_checkpoint
from clipforge.config import ConfigError, ModelConfig, TextTowerConfig, TrainConfig, config_from_dict
from clipforge.distributed.groups import DistributedContext
from clipforge.distributed.wrap import prepare_model
from clipforge.model import create_model
from tests.conftest import tiny_config, write_shapes_manifest

VOCAB, CONTEXT = 50, 12


def model_with(text: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_from_dict(
        {
            "model": {
                "embed_dim": 16,
                "image": {"kind": "vit", "image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2},
                "text": {"width": 32, "depth": 2, "heads": 2, "context_length": CONTEXT, **text},
            }
        }
    )
    return create_model(config.model, vocab_size=VOCAB)


def right_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(lengths))
    ids = torch.randint(1, VOCAB, (len(lengths), CONTEXT), generator=generator)
    mask = (torch.arange(CONTEXT)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, CONTEXT), min_size=1, max_size=17),
    buckets=st.integers(2, 6),
    pooling=st.sampled_from(["eot", "argmax", "mean", "cls"]),
)
def test_buckets_give_the_features_and_gradients_of_one_batch(lengths: list[int], buckets: int, pooling: str) -> None:
    model = model_with({"pooling": pooling}).double()  # float64: the sums' order leaves no visible trace
    ids, mask = right_padded(lengths)
    reference = model.encode_text(ids, mask)
    reference.square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.text_buckets = buckets
    bucketed = model.encode_text(ids, mask)
    bucketed.square().sum().backward()
    torch.testing.assert_close(bucketed, reference, atol=1e-10, rtol=1e-9)
    for name, gradient in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, gradient, atol=1e-10, rtol=1e-9)


def test_a_batch_cut_into_buckets_runs_shorter_sequences() -> None:
    model = model_with({})
    seen: list[int] = []
    model.text_tower.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[1]))
    ids, mask = right_padded([2, 2, 3, 3, 11, 12, 2, 3])
    model.text_buckets = 4
    model.encode_text(ids, mask)
    assert sorted(seen) == [2, 3, 3, 12]  # each bucket cut to its own longest row
    seen.clear()
    model.encode_text(ids[:, :3].contiguous(), torch.ones(8, 3, dtype=torch.long))  # nothing padded: one batch
    assert seen == [3]


def test_towers_that_read_padding_refuse_buckets_and_zero_is_refused() -> None:
    for text in ({"causal": False, "tokenizer": {"padding": "max_length"}}, {"pooling": "last"}):
        model = model_with(text)
        with pytest.raises(ConfigError, match="train.text_buckets=4"):
            prepare_model(model, TrainConfig(text_buckets=4), DistributedContext())
    with pytest.raises(ConfigError, match="train.text_buckets=0"):
        config_from_dict({"train": {"text_buckets": 0}})


def test_a_run_with_buckets_trains_the_weights_of_a_run_without(tmp_path: Path) -> None:
    from clipforge.train.loop import train

    manifest = write_shapes_manifest(tmp_path / "shapes")
    weights = []
    for buckets in (1, 4):
        config = tiny_config(manifest, tmp_path / f"run{buckets}", train={"steps": 4, "text_buckets": buckets})
        result = train(config)
        weights.append(read_checkpoint(result.checkpoint).weights)
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_the_default_is_one_batch() -> None:
    assert TrainConfig().text_buckets == 1
    assert ModelConfig(text=TextTowerConfig()).text.kind == "transformer"
