"""Locked towers (LiT): no gradient, not in the optimizer, unchanged by training, BatchNorm statistics frozen;
partial locks by block; per-tower learning rates with layer-wise decay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipforge.config import ConfigError, ImageTowerConfig, ModelConfig, TextTowerConfig, load_config
from clipforge.data.sources import build_source
from clipforge.data.tokenize import build_tokenizer
from clipforge.interop.load import load_checkpoint
from clipforge.model import create_model
from clipforge.model.factory import build_model
from clipforge.model.locking import layer_ids, layer_lr_scales
from clipforge.train.loop import train
from clipforge.train.optim import build_optimizer
from tests.conftest import tiny_config

VOCAB = 40


def tiny_model_config(image_lock=False, text_lock=False, **text) -> ModelConfig:
    image = ImageTowerConfig(kind="timm", name="test_resnet", image_size=32, lock=image_lock)
    text_config = TextTowerConfig(context_length=8, width=32, depth=3, heads=2, lock=text_lock, **text)
    return ModelConfig(embed_dim=16, image=image, text=text_config)


def test_layer_ids_follow_the_blocks() -> None:
    model = create_model(tiny_model_config(), vocab_size=VOCAB)
    ids, blocks = layer_ids(model.text_tower)
    assert blocks == 3
    assert ids["token_embedding.weight"] == ids["positional_embedding"] == 0
    assert ids["transformer.blocks.0.ln1.weight"] == 1 and ids["transformer.blocks.2.mlp.fc2.bias"] == 3
    assert ids["ln_final.weight"] == 4  # after the last block
    image_ids, image_blocks = layer_ids(model.image_tower)
    assert image_blocks > 1 and image_ids["backbone.conv1.0.weight"] == 0


def test_all_but_last_n_trains_the_last_blocks_and_what_follows() -> None:
    model = create_model(tiny_model_config(text_lock="all-but-last-1"), vocab_size=VOCAB)
    trainable = {name for name, p in model.text_tower.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("transformer.blocks.2.", "ln_final.")) for name in trainable)
    assert "ln_final.weight" in trainable and "transformer.blocks.2.attn.qkv.weight" in trainable
    assert model.text_head.proj.weight.requires_grad
    # the locked blocks stay in eval mode (dropout, statistics); the trainable block follows train()
    model.train()
    assert not model.get_submodule("text_tower.transformer.blocks.0").training
    assert model.get_submodule("text_tower.transformer.blocks.2").training
    with pytest.raises(ValueError, match="asks for 4 trainable blocks but this tower has 3"):
        create_model(tiny_model_config(text_lock="all-but-last-4"), vocab_size=VOCAB)


def test_lock_values_are_checked_by_the_config() -> None:
    assert load_config(None, ["model.text.lock=all-but-last-2"]).model.text.lock == "all-but-last-2"
    with pytest.raises(ConfigError, match="'all-but-last-N'"):
        load_config(None, ["model.image.lock=last-2"])
    with pytest.raises(ConfigError, match="layer_decay"):
        load_config(None, ["model.text.layer_decay=1.5"])


def test_lr_scales_and_layer_decay_reach_the_optimizer() -> None:
    config = tiny_model_config(text_lock="all-but-last-2", lr_scale=0.1, layer_decay=0.5)
    model = create_model(config, vocab_size=VOCAB)
    optimizer = build_optimizer(model, load_config(None, ["optim.lr=1e-3"]).optim, torch.device("cpu"), config)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # heads, logit scale and the image tower
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    tower = model.text_tower
    assert lr_of[id(tower.ln_final.weight)] == pytest.approx(1e-4)  # after the blocks: lr_scale
    assert lr_of[id(tower.transformer.blocks[2].attn.qkv.weight)] == pytest.approx(1e-4 * 0.5)
    assert lr_of[id(tower.transformer.blocks[1].attn.qkv.weight)] == pytest.approx(1e-4 * 0.25)
    assert id(tower.transformer.blocks[0].attn.qkv.weight) not in lr_of  # locked: not in the optimizer
    assert id(tower.token_embedding.weight) not in lr_of
    assert lr_of[id(model.text_head.proj.weight)] == pytest.approx(1e-3)
    scales = layer_lr_scales(tower, 1.0, 0.5)
    assert scales["token_embedding.weight"] == pytest.approx(0.5**4)


def test_locked_towers_are_unchanged_by_training_and_absent_from_the_optimizer(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    """Live towers (no cache): the image tower has BatchNorm, run in train mode around it; nothing locked moves."""
    model_section = {
        "embed_dim": 16,
        "image": {"kind": "timm", "name": "test_resnet", "image_size": 32, "lock": True},
        "text": {
            "kind": "transformer",
            "width": 32,
            "depth": 2,
            "heads": 2,
            "context_length": 16,
            "lock": True,
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
        },
    }
    config = tiny_config(
        shapes_manifest,
        tmp_path / "run",
        model=model_section,
        data={"cache_features": False},
        train={"steps": 4, "batch_size": 8, "checkpoint_every": 4},
    )
    torch.manual_seed(config.train.seed)  # the same initial weights as the run below draws
    source = build_source(config.data)
    captions = [c for i in range(len(source)) for c in source.captions(i)]
    initial = build_model(config, build_tokenizer(config.model.text.tokenizer, "", captions))
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    optimizer = build_optimizer(initial, config.optim, torch.device("cpu"), config.model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in initial.image_tower.parameters())
    assert not any(id(p) in in_optimizer for p in initial.text_tower.parameters())

    after = load_checkpoint(train(config).checkpoint).model.state_dict()
    for name, value in before.items():
        if name.startswith(("image_tower.", "text_tower.")):  # weights and BatchNorm buffers alike
            torch.testing.assert_close(after[name], value, atol=0, rtol=0, msg=name)
    assert not torch.equal(after["image_head.proj.weight"], before["image_head.proj.weight"])
    assert any("running_mean" in name for name in before if name.startswith("image_tower."))


def test_partly_locked_batchnorm_updates_only_in_the_trainable_part() -> None:
    torch.manual_seed(0)
    model = create_model(tiny_model_config(image_lock="all-but-last-1"), vocab_size=VOCAB).train()
    batchnorms = {
        name: module.running_mean.clone()
        for name, module in model.image_tower.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    }
    ids, blocks = layer_ids(model.image_tower)
    model.encode_image(torch.randn(4, 3, 32, 32))
    for name, running_mean in batchnorms.items():
        layer = ids[f"{name}.weight"]
        moved = not torch.equal(model.image_tower.get_submodule(name).running_mean, running_mean)
        assert moved == (layer >= blocks), name
