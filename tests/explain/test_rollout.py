"""Attention rollout against hand-computed examples, and the text-conditioned maps on a real (tiny) ViT."""

from __future__ import annotations

import pytest
import torch

from clipforge.explain.heatmap import explain
from clipforge.explain.rollout import (
    attention_rollout,
    class_token_map,
    gradient_weighted,
    rollout_maps,
    text_conditioned_maps,
)
from clipforge.interop.load import load_checkpoint


def test_two_layer_rollout_equals_the_hand_computation() -> None:
    # layer 1 as two heads whose mean is [[.5, .5, 0], [0, 1, 0], [0, 0, 1]]: the class token looks at patch 1
    head_a = torch.eye(3)
    head_b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    layer_1 = torch.stack([head_a, head_b])[None]  # (1, 2, 3, 3)
    # layer 2, one head: the class token splits between itself and patch 2
    layer_2 = torch.tensor([[[[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    # By hand: Â1 = (A1 + I) / 2 = [[.75, .25, 0], [0, 1, 0], [0, 0, 1]];  Â2 = [[.75, 0, .25], [0, 1, 0], [0, 0, 1]]
    # R = Â2 Â1, row 0 = .75 * [.75, .25, 0] + .25 * [0, 0, 1] = [.5625, .1875, .25]; rows 1, 2 stay identity
    expected = torch.tensor([[0.5625, 0.1875, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rollout = attention_rollout([layer_1, layer_2])
    torch.testing.assert_close(rollout[0], expected)
    # the order of the layers matters: Â1 Â2 would give row 0 = [.5625, .25, .1875]
    torch.testing.assert_close(attention_rollout([layer_2, layer_1])[0, 0], torch.tensor([0.5625, 0.25, 0.1875]))
    # head-fused (B, T, T) input is accepted as it is
    torch.testing.assert_close(attention_rollout([layer_1.mean(1), layer_2[:, 0]]), rollout)


def test_unnormalized_rollout_is_chefers_relevance_update() -> None:
    weights_1 = torch.zeros(1, 3, 3)
    weights_1[0, 0, 1] = 0.2
    weights_2 = torch.zeros(1, 3, 3)
    weights_2[0, 0, 2] = 0.1
    # R = (I + W2)(I + W1): row 0 = [1, 0, .1] @ (I + W1) = [1, .2, 0] + .1 * [0, 0, 1]
    rollout = attention_rollout([weights_1, weights_2], row_normalize=False)
    torch.testing.assert_close(rollout[0, 0], torch.tensor([1.0, 0.2, 0.1]))


def test_gradient_weighting_keeps_positive_products_averaged_over_heads() -> None:
    attention = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.4, 0.6]]]])  # (1, 2 heads, 2, 2)
    gradient = torch.tensor([[[[2.0, -1.0], [1.0, 1.0]], [[-3.0, 5.0], [0.5, -1.0]]]])
    # products: head 1 [[1, -.5], [.2, .8]], head 2 [[-3, 0], [.2, -.6]] -> relu, mean over heads
    expected = torch.tensor([[[0.5, 0.0], [0.2, 0.4]]])
    torch.testing.assert_close(gradient_weighted([attention], [gradient])[0], expected)


def test_class_token_map_is_the_class_row_over_the_patch_grid() -> None:
    rollout = torch.arange(25.0).reshape(1, 5, 5)
    torch.testing.assert_close(class_token_map(rollout, 2), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))
    with pytest.raises(ValueError, match="grid"):
        class_token_map(rollout, 3)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint[0])


def test_vit_maps_have_one_map_per_pair_and_follow_the_text(tiny_checkpoint, loaded) -> None:
    _, images = tiny_checkpoint
    files = [images / "large_red_circle.png", images / "small_blue_square.png"]
    texts = ["a large red circle", "a small blue square", "green"]
    rows = explain(loaded, files, texts)
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)
    assert rows[0][0].method == "attention-gradient"
    for row in rows:
        for explanation in row:
            assert explanation.heatmap.shape == (32, 32)
            # scaled to [0, 1] per map; all zero where no attention path supports the text (relu of the products)
            assert explanation.heatmap.min() == 0.0 and explanation.heatmap.max() in (0.0, pytest.approx(1.0))
            assert explanation.image.size == (32, 32)
    # the map changes with the text, image by image
    for row in rows:
        assert max(abs(row[0].heatmap - row[1].heatmap).max(), abs(row[0].heatmap - row[2].heatmap).max()) > 1e-3
    plain = explain(loaded, files[:1], texts[:2], method="rollout")[0]
    assert (plain[0].heatmap == plain[1].heatmap).all()  # plain rollout ignores the text


def test_model_level_maps_use_the_pure_rollout(loaded) -> None:
    model = loaded.model
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, attentions = model.image_tower(images, return_attention=True)
    torch.testing.assert_close(rollout_maps(model, images), class_token_map(attention_rollout(attentions), 4))
    texts = torch.randn(3, loaded.config.model.embed_dim)
    maps = text_conditioned_maps(model, images, texts)
    assert maps.shape == (2, 3, 4, 4) and (maps >= 0).all()
    # each image's map depends on that image only: the batch gives the same maps as one image at a time
    torch.testing.assert_close(maps[1:], text_conditioned_maps(model, images[1:], texts), rtol=1e-4, atol=1e-6)
