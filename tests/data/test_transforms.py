"""The evaluation resize rules, checked against the libraries they follow, and the bound on decoded pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import v2

from clipforge.config import AugmentConfig
from clipforge.data.transforms import (
    MAX_ASPECT,
    ImagePreprocess,
    bound_aspect,
    build_image_transform,
    center_crop_offset,
    eval_view_box,
    shortest_edge_size,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PREPROCESS = ImagePreprocess(32, MEAN, STD, "bicubic")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def torchvision_pil_reference(size: int, interpolation: T.InterpolationMode) -> T.Compose:
    """open_clip's and timm's evaluation transform: torchvision's Resize / CenterCrop on the PIL image."""
    return T.Compose(
        [T.Resize(size, interpolation=interpolation), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)]
    )


def test_the_crop_offset_rules_part_where_half_a_pixel_is_left() -> None:
    # 640 x 427 resized to 224 is 335 x 224: 111 columns to cut
    assert shortest_edge_size(640, 427, 224) == (335, 224)
    assert shortest_edge_size(427, 640, 224) == (224, 335)
    assert center_crop_offset(335, 224, "round") == 56  # round(55.5): halves to even
    assert center_crop_offset(335, 224, "floor") == 55
    assert center_crop_offset(337, 224, "round") == center_crop_offset(337, 224, "floor") == 56  # round(56.5) = 56


@pytest.mark.parametrize("size", [(800, 100), (100, 800), (640, 427), (427, 640), (100, 1600)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_shortest_is_exactly_torchvision_on_pil_images(size: tuple[int, int], interpolation: str) -> None:
    """8:1, 16:1 and photo shapes: within MAX_ASPECT nothing is cropped before the resize."""
    image = noise_image(*size)
    mode = T.InterpolationMode(interpolation)
    preprocess = dataclasses.replace(PREPROCESS, interpolation=interpolation)
    expected = torchvision_pil_reference(32, mode)(image)
    assert torch.allclose(build_image_transform(preprocess)(image), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(800, 100), (427, 640)])
def test_the_torchvision_backend_is_exactly_torchvision_on_tensors(size: tuple[int, int]) -> None:
    image = noise_image(*size)
    preprocess = dataclasses.replace(PREPROCESS, resize_backend="torchvision")
    reference = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    assert torch.allclose(build_image_transform(preprocess)(image), reference(image), atol=1e-6, rtol=0)


def test_squash_resizes_the_whole_image_and_resize_size_crops_a_larger_resize() -> None:
    image = noise_image(640, 427)
    squash = build_image_transform(dataclasses.replace(PREPROCESS, resize_mode="squash"))(image)
    expected = T.Compose(
        [T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    assert torch.allclose(squash, expected(image), atol=1e-6, rtol=0)
    larger = build_image_transform(dataclasses.replace(PREPROCESS, resize_size=40))(image)
    reference = T.Compose(
        [
            T.Resize(40, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    assert torch.allclose(larger, reference(image), atol=1e-6, rtol=0)


def test_bound_aspect_keeps_the_center_of_the_long_side() -> None:
    assert bound_aspect(noise_image(1, 100_000)).size == (1, MAX_ASPECT)
    assert bound_aspect(noise_image(100_000, 1)).size == (MAX_ASPECT, 1)
    # an odd cut keeps one more pixel, so both ends lose the same: 100_001 - 17 = 2 * 49_992
    assert bound_aspect(noise_image(100_001, 1)).size == (MAX_ASPECT + 1, 1)
    strip = Image.fromarray(np.arange(3 * 200, dtype=np.uint8).reshape(3, 200)).convert("RGB")  # 200 x 3: ramp
    kept = np.asarray(bound_aspect(strip))[0, :, 0]
    assert len(kept) == 3 * MAX_ASPECT and kept[0] == 200 - kept[-1] - 1 == (200 - 48) // 2  # columns 76 .. 123
    within = noise_image(16 * 7, 7)
    assert bound_aspect(within) is within  # 16:1 is untouched: not even copied


def test_the_eval_view_box_maps_the_crop_back_to_the_original() -> None:
    preprocess = dataclasses.replace(PREPROCESS, image_size=224)
    # 640 x 427 -> 335 x 224, crop from column 56: columns 56 .. 280 of 335 are 107.0 .. 534.9 of 640
    box = eval_view_box(preprocess, 640, 427)
    assert box == pytest.approx((56 * 640 / 335, 0.0, 280 * 640 / 335, 427.0))
    assert eval_view_box(dataclasses.replace(preprocess, resize_mode="squash"), 640, 427) == (0.0, 0.0, 640.0, 427.0)
    larger = eval_view_box(dataclasses.replace(preprocess, resize_size=256), 427, 427)  # the middle 224 / 256
    assert larger == pytest.approx((16 * 427 / 256, 16 * 427 / 256, 240 * 427 / 256, 240 * 427 / 256))
    left, top, right, bottom = eval_view_box(preprocess, 10, 100_000)  # bounded to 10 x 160 first
    assert (left, right) == (0.0, 10.0) and bottom - top == pytest.approx(10.0) and (top + bottom) / 2 == 50_000


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)])
@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_an_extreme_strip_is_resized_within_the_bound(
    size: tuple[int, int], mode: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unbounded, the 1 x 100,000 strip would be resized to 32 x 3,200,000 pixels (300 MB as floats)."""
    resized: list[tuple[int, int]] = []
    pil_resize, tensor_resize = Image.Image.resize, v2.functional.resize

    def record_pil(self, target, *args, **kwargs):
        resized.append(tuple(target))
        return pil_resize(self, target, *args, **kwargs)

    def record_tensor(pixels, target, *args, **kwargs):
        resized.append(tuple(target[::-1]))
        return tensor_resize(pixels, target, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", record_pil)
    monkeypatch.setattr(v2.functional, "resize", record_tensor)
    preprocess = dataclasses.replace(PREPROCESS, resize_mode=mode, resize_backend=backend)
    pixels = build_image_transform(preprocess)(noise_image(*size))
    assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all()
    assert resized and max(width * height for width, height in resized) <= 32 * 32 * MAX_ASPECT


def test_the_training_crop_of_an_extreme_strip_stays_small() -> None:
    transform = build_image_transform(PREPROCESS, AugmentConfig(scale_min=0.5, hflip=True))
    torch.manual_seed(0)
    assert transform(noise_image(1, 100_000)).shape == (3, 32, 32)


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_a_whole_area_training_crop_is_deterministic_on_either_backend(backend: str) -> None:
    preprocess = dataclasses.replace(PREPROCESS, resize_backend=backend)
    transform = build_image_transform(preprocess, AugmentConfig(scale_min=1.0, hflip=False))
    image = noise_image(48, 40)
    views = []
    for seed in range(3):
        torch.manual_seed(seed)
        views.append(transform(image))
    assert all(torch.equal(views[0], view) for view in views[1:])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resize_mode": "longest"}, "model.image.resize_mode='longest' is unknown"),
        ({"crop_rounding": "ceil"}, "model.image.crop_rounding='ceil' is unknown"),
        ({"resize_backend": "cv2"}, "model.image.resize_backend='cv2' is unknown"),
        ({"resize_size": 16}, "model.image.resize_size=16 is smaller than the 32 px crop"),
    ],
)
def test_an_impossible_rule_is_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PREPROCESS, **changes)
