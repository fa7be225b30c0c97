"""Image towers: shapes for every kind, pretrained loading from local files, preprocessing choices."""

import dataclasses

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from clipforge.config import ImageTowerConfig
from clipforge.model.vision import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VisionTransformer,
    build_timm_tower,
    build_torchvision_tower,
    build_vit_tower,
    resolve_image_preprocess,
    strip_torchvision_classifier,
    timm_model_name,
)


def tiny_vit_cfg(**overrides) -> ImageTowerConfig:
    values = dict(kind="vit", image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_ratio=2.0)
    values.update(overrides)
    return ImageTowerConfig(**values)


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- built-in ViT
def test_vit_features_and_attention_shapes():
    torch.manual_seed(0)
    tower = build_vit_tower(tiny_vit_cfg()).eval()
    features = tower(images())
    assert tower.output_dim == 32 and features.shape == (2, 32)

    features_again, attentions = tower(images(), return_attention=True)
    torch.testing.assert_close(features, features_again, atol=1e-5, rtol=1e-5)
    tokens = 1 + (32 // 8) ** 2
    assert len(attentions) == 2
    for weights in attentions:
        assert weights.shape == (2, 4, tokens, tokens)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, tokens))


def test_vit_rejects_wrong_image_size():
    tower = VisionTransformer(image_size=32, patch_size=8, width=32, depth=1, heads=4)
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        tower(images(size=40))


def test_vit_loads_local_file_and_refuses_named_weights(tmp_path):
    torch.manual_seed(0)
    source = build_vit_tower(tiny_vit_cfg())
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = build_vit_tower(tiny_vit_cfg(pretrained=str(path)))
    torch.testing.assert_close(loaded.positional_embedding, source.positional_embedding)
    with pytest.raises(ValueError, match="no named weights"):
        build_vit_tower(tiny_vit_cfg(pretrained="IMAGENET1K_V1"))


# ---------------------------------------------------------------- torchvision
def test_torchvision_resnet18_headless_shape():
    tower = build_torchvision_tower(ImageTowerConfig(kind="torchvision", name="resnet18", image_size=32)).eval()
    assert tower.output_dim == 512
    assert tower(images()).shape == (2, 512)


def test_strip_classifier_takes_last_linear_of_a_sequential():
    model = torchvision.models.mobilenet_v3_small(weights=None)  # classifier: Linear, Hardswish, Dropout, Linear
    prefix, in_features = strip_torchvision_classifier(model, "mobilenet_v3_small")
    assert (prefix, in_features) == ("classifier.3", 1024)
    assert isinstance(model.classifier[0], torch.nn.Linear)  # the hidden Linear is part of the features
    assert model.eval()(images()).shape == (2, 1024)


def test_strip_classifier_refuses_a_model_without_one():
    with pytest.raises(ValueError, match="no final Linear classifier"):
        strip_torchvision_classifier(torch.nn.Conv2d(3, 4, 1), "conv")


def test_torchvision_loads_local_state_dict_with_classifier_keys(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    assert "fc.weight" in source.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)

    cfg = ImageTowerConfig(kind="torchvision", name="resnet18", image_size=32, pretrained=str(path))
    tower = build_torchvision_tower(cfg)
    torch.testing.assert_close(tower.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(tower.backbone.bn1.running_var, source.bn1.running_var)
    random_tower = build_torchvision_tower(dataclasses.replace(cfg, pretrained=None))
    assert not torch.equal(random_tower.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)


def test_torchvision_wrong_shape_file_raises_clear_error(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # resnet18 has 7x7 stem kernels
    path = tmp_path / "bad_resnet.pt"
    torch.save(state, path)
    cfg = ImageTowerConfig(kind="torchvision", name="resnet18", pretrained=str(path))
    with pytest.raises(ValueError, match="bad_resnet.pt") as error:
        build_torchvision_tower(cfg)
    message = str(error.value)
    assert "conv1.weight" in message and "(64, 3, 3, 3)" in message and "Fix:" in message


def test_torchvision_other_architecture_file_names_keys(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"unexpected keys \['layer1\.2\."):
        build_torchvision_tower(ImageTowerConfig(kind="torchvision", name="resnet18", pretrained=str(path)))


def test_missing_weights_file_is_an_error_not_a_weights_name():
    cfg = ImageTowerConfig(kind="torchvision", name="resnet18", pretrained="weights/missing.pth")
    with pytest.raises(ValueError, match="no file exists"):
        build_torchvision_tower(cfg)


# ---------------------------------------------------------------- timm
def test_timm_resnet_headless_shape():
    tower = build_timm_tower(ImageTowerConfig(kind="timm", name="test_resnet", image_size=32)).eval()
    assert tower.output_dim == timm.create_model("test_resnet", num_classes=0).num_features
    assert tower(images()).shape == (2, tower.output_dim)


def test_convolutional_backbones_take_channels_last_input_and_give_the_same_features():
    """A CNN's convolutions get NHWC input (faster on oneDNN/cuDNN); its features are those of the plain
    NCHW forward, gradients included. A ViT's single patch convolution does not switch."""
    torch.manual_seed(0)
    tower = build_torchvision_tower(ImageTowerConfig(kind="torchvision", name="resnet18", image_size=32)).eval()
    assert tower.channels_last
    seen = []
    hook = tower.backbone.conv1.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    batch = images().requires_grad_()
    features = tower(batch)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous(
        memory_format=torch.channels_last
    )
    reference = tower.backbone(images().requires_grad_())  # the library model on the NCHW batch
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-4)
    features.sum().backward()
    assert batch.grad is not None and batch.grad.shape == batch.shape
    vit = build_timm_tower(ImageTowerConfig(kind="timm", name="test_vit", image_size=32))
    assert not vit.channels_last


def test_timm_fixed_size_vit_is_built_for_the_config_size():
    # test_vit's pretrained config fixes 160 px input; the tower must accept cfg.image_size instead
    tower = build_timm_tower(ImageTowerConfig(kind="timm", name="test_vit", image_size=32)).eval()
    assert tower(images()).shape == (2, tower.output_dim)


def test_timm_loads_safetensors_with_head_keys(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "test_resnet.safetensors"
    save_file(source.state_dict(), str(path))
    tower = build_timm_tower(ImageTowerConfig(kind="timm", name="test_resnet", pretrained=str(path)))
    torch.testing.assert_close(tower.backbone.conv1[0].weight, source.conv1[0].weight)


# ---------------------------------------------------------------- preprocessing
def test_preprocess_per_kind():
    vit = resolve_image_preprocess(tiny_vit_cfg(image_size=48))
    assert (vit.image_size, vit.mean, vit.std, vit.interpolation) == (48, CLIP_MEAN, CLIP_STD, "bicubic")

    tv = resolve_image_preprocess(ImageTowerConfig(kind="torchvision", name="resnet18"))
    assert (tv.mean, tv.std, tv.interpolation) == (IMAGENET_MEAN, IMAGENET_STD, "bilinear")

    tm = resolve_image_preprocess(ImageTowerConfig(kind="timm", name="test_resnet"))
    expected = timm.models.get_pretrained_cfg("test_resnet")
    assert (tm.mean, tm.std, tm.interpolation) == (tuple(expected.mean), tuple(expected.std), expected.interpolation)

    unknown = resolve_image_preprocess(ImageTowerConfig(kind="timm", name="not_in_timm_registry"))
    assert (unknown.mean, unknown.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_preprocess_config_mean_std_win_and_result_is_frozen():
    cfg = tiny_vit_cfg(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    preprocess = resolve_image_preprocess(cfg)
    assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.std == (0.25, 0.25, 0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preprocess.image_size = 10


def test_timm_tag_naming_and_preprocess_from_the_tagged_config():
    cfg = ImageTowerConfig(kind="timm", name="resnet50", pretrained="a1_in1k")
    assert timm_model_name(cfg) == "resnet50.a1_in1k"
    tagged = timm.models.get_pretrained_cfg("resnet50.a1_in1k")
    assert resolve_image_preprocess(cfg).interpolation == tagged.interpolation
    assert timm_model_name(dataclasses.replace(cfg, pretrained="default")) == "resnet50"
    with pytest.raises(ValueError, match="already names a timm tag"):
        timm_model_name(ImageTowerConfig(kind="timm", name="resnet50.a1_in1k", pretrained="tv_in1k"))
