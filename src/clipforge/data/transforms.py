"""The one place that builds image transforms, for training and for evaluation alike.

Both come from the image tower's :class:`ImagePreprocess` (size,
normalization, interpolation), so a checkpoint evaluates with exactly the preprocessing it trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

from clipforge.config import AugmentConfig
from clipforge.config.schema import LOW_RES_SIDES

_INTERPOLATION = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class ImagePreprocess:
    """What a tower expects: square ``image_size`` input, resized with ``interpolation``, then
    normalized per channel as (pixel / 255 - mean) / std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear" | "nearest" (the last only when a timm model asks for it)


def is_deterministic(augment: AugmentConfig) -> bool:
    """Whether the training transform of ``augment`` gives the same pixels for every seed.

    True for ``scale_min >= 1`` without flip, colour jitter, grayscale, inversion or low-resolution views: a
    random resized crop over the whole area then only differs in aspect ratio, and no ratio but the image's own
    fits the whole area, so it falls back to its fixed center crop (the whole image for ratios within
    (3/4, 4/3)) every time.
    """
    photometric = augment.color_jitter > 0 or augment.grayscale > 0 or augment.invert > 0 or augment.low_res > 0
    return augment.scale_min >= 1.0 and not augment.hflip and not photometric


class LowResolution(torch.nn.Module):
    """Shrink a (C, H, W) image to a random side in ``sides`` (antialiased, aspect kept) and enlarge it back
    to (H, W) with ``interpolation``: the same picture with only that much detail. The side comes from torch's
    global generator, which ``prepare_sample`` seeds per sample."""

    def __init__(self, sides: tuple[int, int], interpolation: v2.InterpolationMode) -> None:
        super().__init__()
        self.sides, self.interpolation = sides, interpolation

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        side = int(torch.randint(self.sides[0], self.sides[1] + 1, ()))
        if side >= min(height, width):
            return image
        small = v2.functional.resize(image, side, interpolation=self.interpolation, antialias=True)
        return v2.functional.resize(small, [height, width], interpolation=self.interpolation, antialias=True)


def _photometric(augment: AugmentConfig, interpolation: v2.InterpolationMode) -> list:
    """The colour steps of ``augment`` on uint8 images: jitter, then grayscale, then inversion, then the
    low-resolution view."""
    steps: list = []
    if augment.color_jitter > 0:
        strength = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    if augment.grayscale > 0:
        steps.append(v2.RandomGrayscale(p=augment.grayscale))
    if augment.invert > 0:
        steps.append(v2.RandomInvert(p=augment.invert))
    if augment.low_res > 0:
        steps.append(v2.RandomApply([LowResolution(LOW_RES_SIDES, interpolation)], p=augment.low_res))
    return steps


def build_image_transform(
    preprocess: ImagePreprocess, augment: AugmentConfig | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalized float tensor (3, size, size).

    ``augment=None`` gives the evaluation transform: resize the short side to ``size``, center crop.
    With an :class:`AugmentConfig` it is the training transform: random resized crop over an area
    fraction in ``(augment.scale_min, 1)``, then an optional horizontal flip and the colour steps
    (``color_jitter``, ``grayscale``, ``invert``, ``low_res``; see :class:`AugmentConfig`).
    """
    size = preprocess.image_size
    interpolation = _INTERPOLATION[preprocess.interpolation]
    if augment is None:
        geometry = [v2.Resize(size, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    else:
        geometry = [
            v2.RandomResizedCrop(size, scale=(augment.scale_min, 1.0), interpolation=interpolation, antialias=True)
        ]
        if augment.hflip:
            geometry.append(v2.RandomHorizontalFlip())
        geometry.extend(_photometric(augment, interpolation))
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
        ]
    )
