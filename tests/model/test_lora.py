"""LoRA adapters (model.*.lora, through peft) on the built-in, timm and Hugging Face towers: the layers each role
targets, a start that computes the tower as it was, only the adapters (and heads) training, and a merge that
computes the same function; a locked tower with adapters is refused (its features would be cached)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipforge.config import ConfigError, config_from_dict
from clipforge.data.tokenize import train_bpe_tokenizer
from clipforge.model.factory import build_checked_model, build_model
from clipforge.model.lora import has_adapters, holds_adapters, merge_adapters, role_of
from clipforge.train.cache_features import plan_feature_cache
from tests.conftest import COLOURS, SHAPES, write_tiny_bert

pytest.importorskip("peft")

TINY_VIT = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2}
TINY_TEXT = {"kind": "transformer", "width": 48, "depth": 2, "heads": 2, "context_length": 16}
TIMM_VIT = {"kind": "timm", "name": "vit_tiny_patch16_224", "image_size": 32}
LORA = {"rank": 4, "alpha": 8.0}
CAPTIONS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def model_config(image: dict, text: dict, **extra):
    values = {"model": {"embed_dim": 32, "image": image, "text": text}, **extra}
    return config_from_dict(values)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CAPTIONS * 4, 300)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def hf_text(folder: Path, **changes) -> dict:
    return {"kind": "hf", "name": str(folder), "context_length": 16, "tokenizer": {"kind": "hf"}, **changes}


def bert_tokenizer(folder: Path):
    from clipforge.data.tokenize import build_tokenizer

    return build_tokenizer(config_from_dict({"model": {"text": hf_text(folder)}}).model.text.tokenizer, str(folder), [])


def embeddings(model, tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = tokenizer(CAPTIONS[:5], 16)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(input_ids, attention_mask)


def randomize_adapters(model) -> None:
    """B starts at zero (the adapters add nothing); give every adapter a nonzero update, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_roles_read_from_module_names() -> None:
    assert role_of("transformer.blocks.0.attn.qkv") == "attention"
    assert role_of("transformer.blocks.0.attn.out_proj") == "attention"
    assert role_of("transformer.blocks.1.mlp.fc2") == "mlp"
    assert role_of("encoder.encoder.layer.0.attention.self.query") == "attention"
    assert role_of("encoder.encoder.layer.0.attention.output.dense") == "attention"  # BERT's attention output
    assert role_of("encoder.encoder.layer.0.intermediate.dense") == "mlp"
    assert role_of("encoder.encoder.layer.0.output.dense") == "mlp"  # BERT's feed-forward output
    assert role_of("transformer.layer.0.ffn.lin1") == "mlp"  # DistilBERT
    assert role_of("patch_embed.proj") is None


def test_each_tower_kind_names_its_layers_by_role(bpe, bert_folder: Path) -> None:
    torch.manual_seed(0)
    builtin = build_model(model_config(TINY_VIT, TINY_TEXT), bpe, adapters=False)
    assert builtin.image_tower.adapter_targets(["attention"]) == [
        "transformer.blocks.0.attn.qkv",
        "transformer.blocks.0.attn.out_proj",
        "transformer.blocks.1.attn.qkv",
        "transformer.blocks.1.attn.out_proj",
    ]
    assert builtin.text_tower.adapter_targets(["mlp"]) == [
        f"transformer.blocks.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)
    ]
    timm_model = build_model(model_config(TIMM_VIT, TINY_TEXT), bpe, adapters=False)
    timm_targets = timm_model.image_tower.adapter_targets(["attention", "mlp"])
    assert len(timm_targets) == 12 * 4 and "backbone.blocks.11.attn.proj" in timm_targets
    assert "backbone.blocks.0.mlp.fc1" in timm_targets and not any("head" in name for name in timm_targets)
    bert = build_model(model_config(TINY_VIT, hf_text(bert_folder)), bert_tokenizer(bert_folder), adapters=False)
    assert bert.text_tower.adapter_targets(["attention"]) == [
        f"encoder.encoder.layer.0.attention.{part}" for part in ("self.query", "self.key", "self.value", "output.dense")
    ]
    assert bert.text_tower.adapter_targets(["mlp"]) == [
        "encoder.encoder.layer.0.intermediate.dense",
        "encoder.encoder.layer.0.output.dense",
    ]


CASES = {
    "builtin": (TINY_VIT, TINY_TEXT),
    "timm+hf": (TIMM_VIT, "bert"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapters_start_as_the_tower_train_alone_and_merge_to_the_same_function(
    case: str, bpe, bert_folder: Path
) -> None:
    image, text = CASES[case]
    text = hf_text(bert_folder) if text == "bert" else text
    tokenizer = bert_tokenizer(bert_folder) if text["kind"] == "hf" else bpe
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = build_model(model_config(image, text), tokenizer).eval()
    adapted_config = model_config({**image, "lora": LORA}, {**text, "lora": {**LORA, "targets": ["attention"]}})
    adapted = build_checked_model(adapted_config, tokenizer, plain.state_dict(), "test").eval()
    assert has_adapters(adapted) and holds_adapters(adapted.state_dict())

    # B = 0: the adapted model computes exactly the plain one
    for before, after in zip(embeddings(plain, tokenizer, images), embeddings(adapted, tokenizer, images), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # only the adapters, the heads and the temperature train; the towers' own weights are frozen
    trainable = [name for name, parameter in adapted.named_parameters() if parameter.requires_grad]
    tower_trainable = [name for name in trainable if name.startswith(("image_tower", "text_tower"))]
    assert tower_trainable and all(".lora_A." in name or ".lora_B." in name for name in tower_trainable)
    assert any(name.startswith("image_head") for name in trainable) and "log_logit_scale" in trainable
    assert not adapted.image_locked and not adapted.text_locked  # a tower with adapters trains: never cached

    randomize_adapters(adapted)
    expected = embeddings(adapted, tokenizer, images)
    assert (expected[0] - embeddings(plain, tokenizer, images)[0]).abs().max() > 1e-2  # the adapters do something
    assert merge_adapters(adapted) > 0
    assert not has_adapters(adapted) and not holds_adapters(adapted.state_dict())
    assert adapted.state_dict().keys() == plain.state_dict().keys()
    for before, after in zip(expected, embeddings(adapted, tokenizer, images), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_the_one_token_fast_paths_see_the_adapters(bpe) -> None:
    # the built-in towers run their last block for the pooled token only; an adapted projection must still apply
    torch.manual_seed(0)
    config = model_config({**TINY_VIT, "lora": LORA}, {**TINY_TEXT, "lora": LORA})
    model = build_model(config, bpe).eval()
    randomize_adapters(model)
    input_ids, attention_mask = bpe(CAPTIONS[:4], 16)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled_fast = model.text_tower(input_ids, attention_mask)
        pooled_full, _ = model.text_tower(input_ids, attention_mask, return_attention=True)
        image_fast = model.image_tower(images)
        image_full, _ = model.image_tower(images, return_attention=True)
    torch.testing.assert_close(pooled_fast, pooled_full, rtol=0, atol=1e-5)
    torch.testing.assert_close(image_fast, image_full, rtol=0, atol=1e-5)


def test_a_locked_tower_with_adapters_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.text.lora.rank=4 trains adapters .* model.text.lock=True freezes it \(a locked tower's features",
    ):
        model_config(TINY_VIT, {**TINY_TEXT, "lock": True, "lora": LORA})
    with pytest.raises(ConfigError, match=r"model.image.lora.rank=4 .*lock='all-but-last-1' freezes part"):
        model_config({**TINY_VIT, "lock": "all-but-last-1", "lora": LORA}, TINY_TEXT)


def test_lit_caching_skips_a_tower_with_adapters(bpe) -> None:
    from clipforge.data.sources import build_source

    config = model_config(
        {**TINY_VIT, "lock": True},
        {**TINY_TEXT, "lora": LORA},
        data={"kind": "emoji", "cache_features": True, "augment": {"scale_min": 1.0}},
    )
    torch.manual_seed(0)
    model = build_model(config, bpe)
    plan = plan_feature_cache(config, model, build_source(config.data))
    assert plan.image_views == 1 and not plan.text  # the locked image tower is cached; the adapted text tower runs


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": -1}, "lora.rank=-1 must be >= 0"),
        ({"rank": 4, "alpha": 0}, r"lora.alpha=0.0 must be positive"),
        ({"rank": 4, "dropout": 1.0}, r"lora.dropout=1.0 must lie in \[0, 1\)"),
        ({"rank": 4, "targets": []}, "name each role once"),
        ({"rank": 4, "targets": ["attn"]}, "is not allowed; choose one of"),
    ],
)
def test_bad_lora_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_config({**TINY_VIT, "lora": changes}, TINY_TEXT)


def test_a_tower_without_layers_of_the_role_says_so(bpe) -> None:
    config = model_config({"kind": "torchvision", "name": "resnet18", "lora": LORA}, TINY_TEXT)
    with pytest.raises(
        ConfigError, match=r"model.image.lora.targets=\['attention', 'mlp'\]: the image tower \(ResNet\)"
    ):
        build_model(config, bpe)
