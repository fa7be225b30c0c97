"""model.image.patch_dropout: in training a ViT sees a random subset of each image's patches (the class token kept);
in evaluation it sees them all and computes exactly the model without patch dropout; only ViT towers take it."""

from __future__ import annotations

import pytest
import torch

from clipforge.config import ConfigError, ImageTowerConfig, config_from_dict
from clipforge.model.vision import build_timm_tower, build_vit_tower

VIT = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2}


def tower_pair(patch_dropout: float, **fields):
    """(a tower with patch dropout, the same weights without)."""
    build = build_timm_tower if fields.get("kind") == "timm" else build_vit_tower
    torch.manual_seed(0)
    dropping = build(ImageTowerConfig(**fields, patch_dropout=patch_dropout))
    plain = build(ImageTowerConfig(**fields))
    plain.load_state_dict(dropping.state_dict())
    return dropping, plain


def tokens_seen(tower, images: torch.Tensor) -> list[tuple[int, ...]]:
    """The token tensor shape each block of the built-in ViT receives."""
    shapes = []
    hooks = [
        block.register_forward_pre_hook(lambda _module, args: shapes.append(tuple(args[0].shape)))
        for block in tower.transformer.blocks
    ]
    try:
        tower(images)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


@pytest.mark.parametrize("patch_dropout", [0.25, 0.5, 0.9])
def test_training_keeps_a_random_share_of_the_patches_and_the_class_token(patch_dropout: float) -> None:
    dropping, _ = tower_pair(patch_dropout, **VIT)
    images = torch.randn(4, 3, 32, 32)
    kept = max(1, round((1 - patch_dropout) * 16))
    assert tokens_seen(dropping.train(), images)[0] == (4, 1 + kept, 48)
    assert tokens_seen(dropping.eval(), images)[0] == (4, 17, 48)
    # which patches survive differs between the images of a batch and between steps
    torch.manual_seed(1)
    first = dropping.train()(images)
    torch.manual_seed(2)
    second = dropping(images)
    assert not torch.allclose(first, second)
    torch.manual_seed(3)
    original = torch.arange(17.0)[None, :, None].expand(4, 17, 1)
    chosen = dropping._drop_patches(original)[:, :, 0]
    assert torch.equal(chosen[:, 0], torch.zeros(4))  # the class token first, always
    assert len({tuple(row.tolist()) for row in chosen}) > 1
    for row in chosen:  # distinct patches, in their original order
        assert torch.all(row[1:].diff() > 0)


def test_evaluation_sees_every_patch_exactly_as_without_patch_dropout() -> None:
    dropping, plain = tower_pair(0.5, **VIT)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(images), plain.eval()(images))
        features, attentions = dropping.forward_with_attention(images)  # explanations: every patch too
        assert attentions[0].shape[-1] == 17
        torch.testing.assert_close(features, plain.forward_with_attention(images)[0], rtol=0, atol=0)


def test_timm_vision_transformers_drop_patches_in_training_only() -> None:
    dropping, plain = tower_pair(0.5, kind="timm", name="vit_tiny_patch16_224", image_size=32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(images), plain.eval()(images))
        torch.manual_seed(0)
        assert not torch.allclose(dropping.train()(images), plain.train()(images))


def test_only_vit_towers_take_patch_dropout() -> None:
    with pytest.raises(ConfigError, match=r"only vision transformers have patch tokens .* kind='torchvision'"):
        config_from_dict({"model": {"image": {"kind": "torchvision", "name": "resnet18", "patch_dropout": 0.5}}})
    with pytest.raises(ConfigError, match=r"patch_dropout=1.0 must lie in \[0, 1\)"):
        config_from_dict({"model": {"image": {**VIT, "patch_dropout": 1.0}}})
    with pytest.raises(ConfigError, match="timm model 'resnet18' has no patch tokens to drop"):
        build_timm_tower(ImageTowerConfig(kind="timm", name="resnet18", patch_dropout=0.5))


def test_a_locked_towers_cached_features_do_not_depend_on_training_only_settings() -> None:
    # a locked tower runs in eval mode (no patch dropout) and has no adapters: its feature cache entries stay valid
    from clipforge.config import LoraConfig
    from clipforge.train.cache_features import _tower_settings

    plain = ImageTowerConfig(**VIT)
    assert _tower_settings(ImageTowerConfig(**VIT, patch_dropout=0.5, lora=LoraConfig(rank=4))) == _tower_settings(
        plain
    )
