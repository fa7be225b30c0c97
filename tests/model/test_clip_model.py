"""CLIPModel: normalized embeddings, similarity formula, output contract, locked towers."""

import dataclasses
import math

import pytest
import torch

from clipforge.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from clipforge.model import (
    CLIP_INIT_LOG_LOGIT_SCALE,
    SIGLIP_INIT_LOG_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    CLIPOutput,
    create_model,
)

VOCAB = 40


def tiny_config(image_kind: str = "vit", lock_image: bool = False, lock_text: bool = False, head="linear"):
    image = ImageTowerConfig(kind=image_kind, image_size=32, patch_size=8, width=32, depth=1, heads=2, head=head)
    if image_kind == "timm":
        image.name = "test_resnet"  # tiny, with BatchNorm
    image.lock = lock_image
    text = TextTowerConfig(context_length=8, width=32, depth=1, heads=2, lock=lock_text, head=head)
    return ModelConfig(embed_dim=16, image=image, text=text)


def batch(num_images: int = 3, num_texts: int = 3):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(num_images, 3, 32, 32, generator=generator)
    input_ids = torch.randint(1, VOCAB, (num_texts, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    return images, input_ids, attention_mask


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model(tiny_config(head="mlp"), vocab_size=VOCAB).eval()


def test_embeddings_are_unit_norm_unless_asked_raw(model):
    images, input_ids, attention_mask = batch()
    image_features = model.encode_image(images)
    text_features = model.encode_text(input_ids, attention_mask)
    assert image_features.shape == (3, 16) and text_features.shape == (3, 16)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    raw_image = model.encode_image(images, normalize=False)
    raw_text = model.encode_text(input_ids, attention_mask, normalize=False)
    assert not torch.allclose(raw_image.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(raw_text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(raw_image / raw_image.norm(dim=-1, keepdim=True), image_features)


def test_forward_contract(model):
    output = model(*batch())
    assert isinstance(output, CLIPOutput)
    assert {field.name for field in dataclasses.fields(output)} == {
        "image_embeds",
        "text_embeds",
        "logit_scale",
        "logit_bias",
    }
    assert model.log_logit_scale.item() == pytest.approx(math.log(1 / 0.07))  # the parameter: log t
    # the output: the multiplier t itself, taken from the parameter inside forward (so with its gradient)
    assert output.logit_scale.ndim == 0 and output.logit_scale.item() == pytest.approx(1 / 0.07)
    assert torch.equal(output.logit_scale, model.log_logit_scale.exp()) and output.logit_scale.requires_grad
    assert output.logit_bias is None
    torch.testing.assert_close(output.image_embeds, model.encode_image(batch()[0]))
    assert "logits_per_image" not in vars(output)  # no (B, B) matrix unless it is read


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_output_logits_are_the_similarity_matrix(loss_kind):
    torch.manual_seed(0)
    model = create_model(tiny_config(), loss_kind=loss_kind, vocab_size=VOCAB).eval()
    images, input_ids, attention_mask = batch(num_images=3, num_texts=2)
    with torch.no_grad():
        output = model(images, input_ids, attention_mask)
        expected = output.logit_scale * output.image_embeds @ output.text_embeds.T
        if loss_kind == "siglip":
            expected = expected + model.logit_bias
        assert output.logits_per_image.shape == (3, 2) and torch.equal(output.logits_per_image, expected)
        assert torch.equal(output.logits_per_text, expected.T)
        assert torch.equal(model.generate_similarity_matrix(images, input_ids, attention_mask), expected)


def test_old_names_fail_with_a_pointer_to_the_new_ones(model):
    # model.logit_scale is the log parameter in open_clip and Hugging Face: here it is absent, never t in disguise
    with pytest.raises(AttributeError, match="log_logit_scale"):
        model.logit_scale  # noqa: B018
    assert not hasattr(model, "logit_scale")
    assert model.log_logit_scale is dict(model.named_parameters())["log_logit_scale"]  # other lookups unchanged
    with pytest.raises(TypeError, match=r"output\.image_embeds"):
        model(*batch())["image_features"]


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_similarity_matrix_matches_pairwise_formula(loss_kind):
    torch.manual_seed(0)
    model = create_model(tiny_config(), loss_kind=loss_kind, vocab_size=VOCAB).eval()
    images, input_ids, attention_mask = batch(num_images=3, num_texts=2)
    with torch.no_grad():
        logits = model.generate_similarity_matrix(images, input_ids, attention_mask)
        raw_images = model.encode_image(images, normalize=False)
        raw_texts = model.encode_text(input_ids, attention_mask, normalize=False)
    assert logits.shape == (3, 2)
    scale = math.exp(CLIP_INIT_LOG_LOGIT_SCALE if loss_kind == "clip" else SIGLIP_INIT_LOG_LOGIT_SCALE)
    bias = 0.0 if loss_kind == "clip" else SIGLIP_INIT_LOGIT_BIAS
    for i in range(3):
        for j in range(2):
            a, b = raw_images[i], raw_texts[j]
            cosine = float(a @ b) / (float(a.norm()) * float(b.norm()))
            assert logits[i, j].item() == pytest.approx(scale * cosine + bias, abs=1e-4)


def test_siglip_model_has_learnable_bias():
    model = create_model(tiny_config(), loss_kind="siglip", vocab_size=VOCAB)
    assert model.logit_bias.requires_grad and model.logit_bias.item() == SIGLIP_INIT_LOGIT_BIAS
    assert model.log_logit_scale.item() == pytest.approx(math.log(10))


def test_locked_towers_get_no_gradient_and_stay_in_eval():
    torch.manual_seed(0)
    config = tiny_config(image_kind="timm", lock_image=True, lock_text=True)
    model = create_model(config, vocab_size=VOCAB)
    model.train()
    assert model.training and model.image_head.training
    assert not any(module.training for module in model.image_tower.modules())
    assert not any(module.training for module in model.text_tower.modules())

    running_mean = model.image_tower.backbone.bn1.running_mean.clone()
    output = model(*batch())
    logits = output.logits_per_image  # t * image_embeds @ text_embeds.T
    torch.nn.functional.cross_entropy(logits, torch.arange(3)).backward()

    assert all(p.grad is None for p in model.image_tower.parameters())
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert all(p.grad is not None for p in model.image_head.parameters())
    assert all(p.grad is not None for p in model.text_head.parameters())
    assert model.log_logit_scale.grad is not None
    torch.testing.assert_close(model.image_tower.backbone.bn1.running_mean, running_mean, atol=0, rtol=0)


def test_unfrozen_tower_trains_its_batchnorm():
    torch.manual_seed(0)
    model = create_model(tiny_config(image_kind="timm"), vocab_size=VOCAB).train()
    running_mean = model.image_tower.backbone.bn1.running_mean.clone()
    model(*batch())
    assert not torch.equal(model.image_tower.backbone.bn1.running_mean, running_mean)
    assert all(p.requires_grad for p in model.image_tower.parameters())


def test_input_validation_errors(model):
    images, input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model.encode_image(images[:, 0])
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model.encode_image(images[:, :1])
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.encode_text(input_ids, attention_mask[:, :-1])
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model.encode_text(input_ids[0], attention_mask[0])
    with pytest.raises(ValueError, match="integer token ids"):
        model.encode_text(input_ids.float(), attention_mask)
