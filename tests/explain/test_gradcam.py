"""Grad-CAM on a CNN tower: the block it hooks, map shape, and that the map follows the text."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipforge.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from clipforge.explain.gradcam import gradcam_maps, last_conv_block
from clipforge.model import create_model


@pytest.fixture(scope="module")
def resnet_model():
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=16,
        image=ImageTowerConfig(kind="torchvision", name="resnet18", image_size=96),
        text=TextTowerConfig(width=32, depth=1, heads=2, context_length=8),
    )
    return create_model(config, vocab_size=100).eval()


def test_the_last_conv_block_is_found_by_type(resnet_model) -> None:
    tower = resnet_model.image_tower
    block, activation, output = last_conv_block(tower, torch.randn(1, 3, 96, 96))
    assert block is tower.backbone.layer4  # ResNet's last stage, found without looking at names
    assert activation.shape == (1, 512, 3, 3) and output.shape == (1, 512)


def test_gradcam_maps_have_input_size_and_change_with_the_text(resnet_model) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 96)
    texts = torch.randn(3, 16)
    maps = gradcam_maps(resnet_model, images, texts)
    assert maps.shape == (2, 3, 96, 96)
    assert (maps >= 0).all() and maps.flatten(2).amax(-1).gt(0).any()
    assert not torch.allclose(maps[:, 0], maps[:, 1])
    # the opposite text direction flips every channel weight: relu keeps the complementary regions
    flipped = gradcam_maps(resnet_model, images, -texts[:1])
    assert not torch.allclose(flipped[:, 0], maps[:, 0])
    # images are independent (BatchNorm in eval mode): a batch gives each image's own map
    torch.testing.assert_close(maps[1:], gradcam_maps(resnet_model, images[1:], texts), rtol=1e-4, atol=1e-6)


class PatchLinear(nn.Module):
    """A ViT-like tower: one patch convolution, then Linear layers on the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.mix = nn.Linear(8, 8)
        self.output_dim = 8

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mix(self.patch(images).flatten(2).transpose(1, 2)).mean(1)


def test_a_tower_that_is_not_a_cnn_is_refused() -> None:
    with pytest.raises(ValueError, match="not a CNN"):
        last_conv_block(PatchLinear(), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no convolutional block"):
        last_conv_block(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), torch.randn(1, 3, 4, 4))
