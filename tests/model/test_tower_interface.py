"""The tower interface: every tower kind answers output_dim, checkpointing, sharding units, attention maps and
describe(), and the callers (checkpointing, FSDP wrapping, explain) ask it instead of testing its class."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from clipforge.config import ImageTowerConfig, ModelConfig, TextTowerConfig, TokenizerConfig
from clipforge.distributed import wrap
from clipforge.explain.heatmap import resolve_method
from clipforge.explain.rollout import vit_tower
from clipforge.model import CLIPModel, Tower, create_model
from clipforge.model.factory import LoadedModel
from clipforge.model.grad_checkpointing import enable_grad_checkpointing
from clipforge.model.vision import build_timm_tower, build_torchvision_tower, build_vit_tower
from tests.conftest import write_tiny_bert

VOCAB = 16  # the tiny BERT's vocabulary size


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_bert(tmp_path_factory.mktemp("tower-interface") / "bert"))


def image_towers() -> dict[str, Tower]:
    torch.manual_seed(0)
    return {
        "vit": build_vit_tower(ImageTowerConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2)),
        "torchvision": build_torchvision_tower(ImageTowerConfig(kind="torchvision", name="resnet18")),
        "timm": build_timm_tower(ImageTowerConfig(kind="timm", name="test_vit", image_size=32)),
    }


def tiny_model(bert_folder: str | None = None) -> CLIPModel:
    text = TextTowerConfig(width=32, depth=2, heads=2, context_length=8)
    if bert_folder is not None:
        text = TextTowerConfig(kind="hf", name=bert_folder, context_length=8, tokenizer=TokenizerConfig(kind="hf"))
    image = ImageTowerConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2)
    torch.manual_seed(0)
    return create_model(ModelConfig(embed_dim=16, image=image, text=text), vocab_size=VOCAB)


def test_every_image_tower_kind_answers_the_interface() -> None:
    towers = image_towers()
    images = torch.randn(2, 3, 32, 32)
    expected = {
        "vit": ("VisionTransformer", True, True),
        "torchvision": ("ResNet", False, False),
        "timm": ("VisionTransformer", True, False),  # timm's own ViT class
    }
    for kind, tower in towers.items():
        name, checkpointing, attention = expected[kind]
        assert isinstance(tower, Tower), kind
        with torch.no_grad():
            assert tower.eval()(images).shape == (2, tower.output_dim), kind
        assert tower.describe() == name, kind
        assert tower.set_grad_checkpointing(True) is checkpointing, kind
        assert tower.supports_attention_maps is attention, kind
        assert tower.hf_config_json() is None, kind
    vit = towers["vit"]
    assert vit.sharding_units() == list(vit.transformer.blocks) and len(vit.sharding_units()) == 2
    assert towers["torchvision"].sharding_units() == [] and towers["timm"].sharding_units() == []
    assert towers["timm"].backbone.grad_checkpointing  # timm's own switch was used
    assert vit.grid_size == 4 and towers["torchvision"].grid_size is None


def test_builtin_switches_go_both_ways_and_attention_matches_forward() -> None:
    vit = image_towers()["vit"].eval()
    assert vit.set_grad_checkpointing(True) and vit.transformer.grad_checkpointing
    assert vit.set_grad_checkpointing(False) and not vit.transformer.grad_checkpointing
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, attentions = vit.forward_with_attention(images)
        reference, reference_attentions = vit(images, return_attention=True)
    torch.testing.assert_close(features, reference)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(attentions[1], reference_attentions[1])
    text = tiny_model().text_tower.eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    features, attentions = text.forward_with_attention(ids, torch.ones_like(ids))
    assert features.shape == (2, text.output_dim) and len(attentions) == 2
    assert text.sharding_units() == list(text.transformer.blocks) and text.describe() == "TextTransformer"
    with pytest.raises(TypeError, match="ResNet does not return attention maps"):
        image_towers()["torchvision"].forward_with_attention(images)


def test_hugging_face_tower_answers_the_interface(bert_folder: str) -> None:
    tower = tiny_model(bert_folder).text_tower
    assert isinstance(tower, Tower) and tower.output_dim == 32 and tower.describe() == "BertModel"
    assert tower.sharding_units() == [] and not tower.supports_attention_maps
    assert json.loads(tower.hf_config_json())["hidden_size"] == 32
    encoder = tower.encoder

    def checkpointing() -> bool:  # transformers 5 renamed the flag
        if hasattr(encoder, "is_activation_checkpointing"):
            return encoder.is_activation_checkpointing
        return encoder.is_gradient_checkpointing

    assert tower.set_grad_checkpointing(True) and checkpointing()
    assert tower.set_grad_checkpointing(False) and not checkpointing()


class PlainTower(Tower):
    """A tower that only implements forward: the interface's defaults describe it."""

    def __init__(self) -> None:
        super().__init__()
        self.output_dim = 8
        self.mix = nn.Linear(3, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mix(images.mean(dim=(2, 3)))


class PatchAttentionTower(PlainTower):
    """Not the built-in ViT, but it says it gives attention maps over a 2 x 2 patch grid."""

    grid_size = 2

    @property
    def supports_attention_maps(self) -> bool:
        return True


def test_callers_ask_the_tower_not_its_class() -> None:
    model = tiny_model()
    model.image_tower = PlainTower()
    assert enable_grad_checkpointing(model) == ["image tower (PlainTower)"]
    assert model.text_tower.transformer.grad_checkpointing
    loaded = LoadedModel(model, processor=None, config=None, step=0)  # resolve_method reads the model only
    assert resolve_method(loaded) == "gradcam"
    with pytest.raises(ValueError, match="needs an image tower with attention maps.*not PlainTower"):
        resolve_method(loaded, "rollout")
    with pytest.raises(TypeError, match="not PlainTower"):
        vit_tower(model)
    model.image_tower = PatchAttentionTower()
    assert resolve_method(loaded) == "attention-gradient" and vit_tower(model) is model.image_tower


def test_fsdp_shards_the_units_each_tower_names(monkeypatch: pytest.MonkeyPatch) -> None:
    sharded: list[nn.Module] = []

    class FakeFSDP:
        @staticmethod
        def fully_shard(module: nn.Module, **options) -> None:
            sharded.append(module)

    monkeypatch.setattr(wrap, "_fsdp", lambda: FakeFSDP)
    model = tiny_model()
    wrap.shard_model(model)
    image, text = model.image_tower, model.text_tower
    assert sharded == [*image.sharding_units(), image, *text.sharding_units(), text, model]
    assert len(sharded) == 2 + 1 + 2 + 1 + 1
    sharded.clear()
    for parameter in text.parameters():  # a frozen tower is one unit
        parameter.requires_grad_(False)
    wrap.shard_model(model)
    assert sharded == [*image.sharding_units(), image, text, model]
