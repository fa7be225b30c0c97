"""create_model: tower selection by explicit kind, loss-dependent init, parameter counts."""

import math

import pytest
import torch
from transformers import DistilBertConfig, DistilBertModel

from clipforge.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from clipforge.model import MAX_LOG_LOGIT_SCALE, CLIPModel, count_parameters, create_model
from clipforge.model.heads import LinearHead, MLPHead, build_head
from clipforge.model.registry import (
    CLIP_INIT_LOG_LOGIT_SCALE,
    SIGLIP_INIT_LOG_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
)
from clipforge.model.text import HFTextEncoder, TextTransformer
from clipforge.model.vision import BackboneTower, VisionTransformer

VOCAB = 30


def tiny_image(**overrides) -> ImageTowerConfig:
    values = dict(kind="vit", image_size=32, patch_size=16, width=32, depth=1, heads=2)
    values.update(overrides)
    return ImageTowerConfig(**values)


def tiny_text(**overrides) -> TextTowerConfig:
    values = dict(context_length=8, width=32, depth=1, heads=2)
    values.update(overrides)
    return TextTowerConfig(**values)


def test_constants():
    assert math.exp(CLIP_INIT_LOG_LOGIT_SCALE) == pytest.approx(1 / 0.07)
    assert math.exp(SIGLIP_INIT_LOG_LOGIT_SCALE) == pytest.approx(10.0)
    assert SIGLIP_INIT_LOGIT_BIAS == -10.0
    assert math.exp(MAX_LOG_LOGIT_SCALE) == pytest.approx(100.0)


def test_builtin_towers_and_heads():
    model = create_model(ModelConfig(embed_dim=8, image=tiny_image(), text=tiny_text(head="mlp")), vocab_size=VOCAB)
    assert isinstance(model, CLIPModel)
    assert isinstance(model.image_tower, VisionTransformer) and isinstance(model.text_tower, TextTransformer)
    assert isinstance(model.image_head, LinearHead) and isinstance(model.text_head, MLPHead)
    assert model.image_head.proj.bias is None


def test_timm_image_with_hf_text_end_to_end(tmp_path):
    torch.manual_seed(0)
    DistilBertModel(
        DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16)
    ).save_pretrained(tmp_path)
    config = ModelConfig(
        embed_dim=8,
        image=tiny_image(kind="timm", name="test_resnet", head="mlp"),
        text=tiny_text(kind="hf", name=str(tmp_path), pretrained="default"),
    )
    model = create_model(config, loss_kind="siglip").eval()
    assert isinstance(model.image_tower, BackboneTower) and isinstance(model.text_tower, HFTextEncoder)
    ids = torch.randint(1, VOCAB, (2, 8))
    logits = model.generate_similarity_matrix(torch.randn(3, 3, 32, 32), ids, torch.ones_like(ids))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_unknown_kinds_raise():
    with pytest.raises(ValueError, match=r"model.image.kind='resnet'.*\['open_clip', 'timm', 'torchvision', 'vit'\]"):
        create_model(ModelConfig(image=tiny_image(kind="resnet"), text=tiny_text()), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="model.text.kind='bert'"):
        create_model(ModelConfig(image=tiny_image(), text=tiny_text(kind="bert")), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="loss.kind='infonce'"):
        create_model(ModelConfig(image=tiny_image(), text=tiny_text()), loss_kind="infonce", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="projection head kind='conv'"):
        build_head("conv", 4, 4)


def test_builtin_text_requires_vocab_size():
    with pytest.raises(ValueError, match="needs vocab_size"):
        create_model(ModelConfig(image=tiny_image(), text=tiny_text()))


def test_count_parameters_adds_up_and_tracks_locking():
    config = ModelConfig(embed_dim=8, image=tiny_image(lock=True), text=tiny_text())
    model = create_model(config, loss_kind="siglip", vocab_size=VOCAB)
    counts = count_parameters(model)
    image_total = sum(p.numel() for p in model.image_tower.parameters())
    assert counts["image_tower"] == {"total": image_total, "trainable": 0}
    assert counts["logit"] == {"total": 2, "trainable": 2}
    parts = ("image_tower", "text_tower", "image_head", "text_head", "logit")
    assert counts["all"]["total"] == sum(counts[part]["total"] for part in parts)
    assert counts["all"]["trainable"] == counts["all"]["total"] - image_total
