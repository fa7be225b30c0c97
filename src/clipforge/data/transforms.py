"""The one place that builds image transforms, for training and for evaluation alike.

Both come from the image tower's :class:`ImagePreprocess` (size, resize rule, normalization, interpolation), so a
checkpoint evaluates with exactly the preprocessing it trained with, and an imported model with exactly its source
framework's: the same output size rule, the same center-crop offset and the same library call for the resize
(``PIL.Image.resize`` as open_clip, timm and transformers' PIL backend do; torchvision's tensor kernels as
transformers' default backend does).

It is also where decoded pixels meet their one bound after the decode guard, for every command: no resize here makes
an image larger than ``S`` x ``(MAX_ASPECT + 1) * S`` pixels, ``S`` the larger of ``image_size`` and ``resize_size``
(see :data:`MAX_ASPECT`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1_transforms
from torchvision.transforms import v2

from clipforge.config import LOW_RES_SIDES, AugmentConfig
from clipforge.data.naflex import naflex_grid, pack, patchify

_INTERPOLATION = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
}
_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("shortest", "squash", "naflex")
CROP_ROUNDINGS = ("round", "floor")
RESIZE_BACKENDS = ("pil", "torchvision")
MAX_ASPECT = 16
"""The largest aspect ratio (long side / short side) the ``shortest`` resize is given.

Resizing the short side of a 1 x 1,000,000 strip (a 3 MB decode, well within the decode guard) to 224 px would make
a 224 x 224,000,000 image, 150 GB of uint8, of which the center crop keeps 224 rows. A wider image first loses the
ends of its long side: it is center-cropped to ``short * MAX_ASPECT`` (one more where that keeps the center exactly
the center), which still holds at least 16 times what the final crop keeps. Images within 16:1 (photos, ordinary
panoramas) are untouched, so their pixels are exactly the source framework's.
"""


@dataclass(frozen=True)
class ImagePreprocess:
    """What a tower expects: square ``image_size`` input, normalized per channel as (pixel / 255 - mean) / std.

    The evaluation resize (training takes a random resized crop instead), filter ``interpolation``:

    * ``resize_mode="shortest"``: the short side to ``resize_size`` (None = ``image_size``), the long side to
      ``int(resize_size * long / short)`` (truncated: torchvision's and transformers' rule), then the center
      ``image_size`` x ``image_size`` crop at offset (resized - image_size) / 2, rounded by ``crop_rounding``:
      ``round`` = Python's ``round`` (halves to even: torchvision's CenterCrop, used by open_clip and timm) or
      ``floor`` (transformers' ``center_crop``). On a 640 x 427 photo resized to 335 x 224 the offset is 55.5:
      torchvision takes 56, transformers 55.
    * ``resize_mode="squash"``: the whole image to ``image_size`` x ``image_size`` (SigLIP), nothing cropped.
    * ``resize_mode="naflex"`` (SigLIP 2's variable resolution): the whole image, aspect kept, to the largest grid of
      ``patch_size`` pixel patches with at most ``max_num_patches`` patches, then packed as
      :mod:`clipforge.data.naflex` says: (max_num_patches, patch_size^2 * 3 + 3) per image, not (3, S, S);
      ``image_size`` is then the square its tower's position table was learned at.

    ``resize_backend``: ``pil`` = ``PIL.Image.resize`` on the image (open_clip, timm, transformers' PIL backend);
    ``torchvision`` = torchvision's antialiased kernels on its uint8 tensor (transformers' default backend).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear" | "nearest" (the last only when a timm model asks for it)
    resize_mode: str = "shortest"
    resize_size: int | None = None
    crop_rounding: str = "round"
    resize_backend: str = "pil"
    patch_size: int | None = None  # naflex only
    max_num_patches: int | None = None  # naflex only

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("interpolation", self.interpolation, tuple(_INTERPOLATION)),
            ("resize_mode", self.resize_mode, RESIZE_MODES),
            ("crop_rounding", self.crop_rounding, CROP_ROUNDINGS),
            ("resize_backend", self.resize_backend, RESIZE_BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"model.image.{name}={value!r} is unknown; choose one of {list(allowed)}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(
                f"model.image.resize_size={self.resize_size} is smaller than the {self.image_size} px crop "
                f"(model.image.image_size): the crop would run off the resized image"
            )
        naflex = (self.patch_size, self.max_num_patches)
        if (self.resize_mode == "naflex") != all(value is not None and value > 0 for value in naflex):
            raise ValueError(
                f"resize_mode={self.resize_mode!r} with patch_size={self.patch_size}, max_num_patches="
                f"{self.max_num_patches}: the NaFlex resize needs both (positive), the others neither"
            )

    @property
    def short_side(self) -> int:
        """The short side's length after a ``shortest`` resize."""
        return self.resize_size or self.image_size


# ----------------------------------------------------------------------------------------------
# Evaluation geometry: bound, resize, center crop
# ----------------------------------------------------------------------------------------------
def bound_aspect(image: Image.Image, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """``image``, or its center along the long side when long / short > ``max_aspect`` (see :data:`MAX_ASPECT`).

    The kept length is ``short * max_aspect``, plus one when the cut (long - kept) is odd, so both ends lose the
    same number of pixels and the center stays the center. Lazy: nothing is copied for an image within bounds.
    """
    box = _aspect_box(*image.size, max_aspect)
    return image if box is None else image.crop(box)


def _aspect_box(width: int, height: int, max_aspect: int = MAX_ASPECT) -> tuple[int, int, int, int] | None:
    """:func:`bound_aspect`'s crop box (left, top, right, bottom), or None for an image within bounds."""
    short, long = min(width, height), max(width, height)
    if long <= short * max_aspect:
        return None
    kept = short * max_aspect + (long - short * max_aspect) % 2
    start = (long - kept) // 2
    return (start, 0, start + kept, height) if width > height else (0, start, width, start + kept)


def shortest_edge_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``short_side``: the long side becomes
    ``int(short_side * long / short)``, truncated (torchvision's ``Resize(int)`` and transformers' ``shortest_edge``
    compute it alike)."""
    short, long = min(width, height), max(width, height)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if width <= height else (new_long, short_side)


def center_crop_offset(extent: int, crop: int, rounding: str) -> int:
    """Where a center crop of ``crop`` starts in ``extent`` pixels: (extent - crop) / 2, rounded half to even
    (``round``, torchvision) or down (``floor``, transformers)."""
    if rounding == "floor":
        return (extent - crop) // 2
    return int(round((extent - crop) / 2.0))


def eval_view_box(preprocess: ImagePreprocess, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a ``width`` x ``height`` image that its evaluation view shows, as (left, top, right, bottom) in
    the image's pixels: all of it for ``squash``; for ``shortest`` the center crop mapped back through the resize
    (and the :data:`MAX_ASPECT` bound). What an overlay on the original (an explanation's heat map) should cover."""
    if preprocess.resize_mode in ("squash", "naflex"):
        return (0.0, 0.0, float(width), float(height))
    left, top, right, bottom = _aspect_box(width, height) or (0, 0, width, height)
    new_width, new_height = shortest_edge_size(right - left, bottom - top, preprocess.short_side)
    scale_x, scale_y = (right - left) / new_width, (bottom - top) / new_height
    size = preprocess.image_size
    crop_left = center_crop_offset(new_width, size, preprocess.crop_rounding)
    crop_top = center_crop_offset(new_height, size, preprocess.crop_rounding)
    return (
        left + crop_left * scale_x,
        top + crop_top * scale_y,
        left + (crop_left + size) * scale_x,
        top + (crop_top + size) * scale_y,
    )


def resize_image(
    image: Image.Image | torch.Tensor, size: tuple[int, int], preprocess: ImagePreprocess
) -> Image.Image | torch.Tensor:
    """``image`` resized to ``size`` = (width, height) by the backend's own call: ``PIL.Image.resize`` (a PIL image)
    or torchvision's antialiased kernel on the uint8 (3, H, W) tensor (a PIL image is converted first)."""
    interpolation = preprocess.interpolation
    if preprocess.resize_backend == "pil":
        return image.resize(size, resample=_PIL_FILTERS[interpolation])
    if isinstance(image, Image.Image):
        # the layout transformers' torchvision backend hands to the same kernel: (3, H, W), contiguous uint8
        image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    width, height = size
    return v2.functional.resize(image, [height, width], interpolation=_INTERPOLATION[interpolation], antialias=True)


class EvalGeometry:
    """PIL image -> the ``image_size`` x ``image_size`` view of :class:`ImagePreprocess`'s evaluation resize: a PIL
    image (``pil`` backend) or a uint8 (3, S, S) tensor (``torchvision`` backend)."""

    def __init__(self, preprocess: ImagePreprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> Image.Image | torch.Tensor:
        preprocess, size = self.preprocess, self.preprocess.image_size
        if preprocess.resize_mode == "squash":
            return resize_image(image, (size, size), preprocess)
        image = bound_aspect(image)
        width, height = shortest_edge_size(*image.size, preprocess.short_side)
        resized = resize_image(image, (width, height), preprocess)
        left = center_crop_offset(width, size, preprocess.crop_rounding)
        top = center_crop_offset(height, size, preprocess.crop_rounding)
        if isinstance(resized, Image.Image):
            return resized.crop((left, top, left + size, top + size))
        return resized[:, top : top + size, left : left + size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.preprocess})"


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


class NaFlexTransform:
    """PIL RGB image -> packed NaFlex tensor (max_num_patches, patch_size^2 * 3 + 3) (:mod:`clipforge.data.naflex`).

    Evaluation: the whole image, resized (by ``resize_backend``, as transformers' ``Siglip2ImageProcessor``) to the
    largest patch grid within the budget that keeps its aspect ratio, normalized, cut into patches, padded.
    Training (``augment``): first a random crop of an area fraction in (``scale_min``, 1) whose aspect ratio lies
    within 3/4 to 4/3 of the image's own, then the optional flip, the same NaFlex resize of the crop and the colour
    steps. Training views keep their aspect ratio as evaluation does (no square crop), and every view fills the
    patch budget up to the rounding of its grid: batches have a fixed size because every image is padded to
    ``max_num_patches`` patches.
    """

    def __init__(self, preprocess: ImagePreprocess, augment: AugmentConfig | None = None) -> None:
        self.preprocess, self.augment = preprocess, augment
        interpolation = _INTERPOLATION[preprocess.interpolation]
        steps = _photometric(augment, interpolation) if augment is not None else []
        self.photometric = v2.Compose(steps) if steps else None
        self.normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std))]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        patch, budget = self.preprocess.patch_size, self.preprocess.max_num_patches
        if self.augment is not None:
            image = self._random_view(image, self.augment)
        rows, cols = naflex_grid(image.height, image.width, patch, budget)
        pixels = v2.functional.to_image(resize_image(image, (cols * patch, rows * patch), self.preprocess))
        if self.photometric is not None:
            pixels = self.photometric(pixels)
        return pack(patchify(self.normalize(pixels).as_subclass(torch.Tensor), patch), rows, cols, budget)

    @staticmethod
    def _random_view(image: Image.Image, augment: AugmentConfig) -> Image.Image:
        if augment.scale_min < 1.0:
            aspect = image.width / image.height
            top, left, height, width = v1_transforms.RandomResizedCrop.get_params(
                image, scale=(augment.scale_min, 1.0), ratio=(aspect * 3 / 4, aspect * 4 / 3)
            )
            image = image.crop((left, top, left + width, top + height))
        if augment.hflip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.preprocess}, augment={self.augment})"


def build_image_transform(
    preprocess: ImagePreprocess, augment: AugmentConfig | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalized float tensor (3, size, size); for ``resize_mode="naflex"`` the packed patches of
    :class:`NaFlexTransform` instead.

    ``augment=None`` gives the evaluation transform, :class:`EvalGeometry` (``shortest``: short side to
    ``resize_size``, center crop; ``squash``: whole image to size x size; see :class:`ImagePreprocess`).
    With an :class:`AugmentConfig` it is the training transform: random resized crop over an area
    fraction in ``(augment.scale_min, 1)``, then an optional horizontal flip and the colour steps
    (``color_jitter``, ``grayscale``, ``invert``, ``low_res``; see :class:`AugmentConfig`).

    The resize runs on the PIL image with the ``pil`` backend (as open_clip and timm train and evaluate), on the
    uint8 tensor with ``torchvision``; the colour steps always on the uint8 tensor. Memory stays bounded for
    any decoded image: ``squash`` and the random resized crop produce size x size pixels whatever the input's
    shape, and ``shortest`` first bounds the aspect ratio by :data:`MAX_ASPECT`.
    """
    if preprocess.resize_mode == "naflex":
        return NaFlexTransform(preprocess, augment)
    size = preprocess.image_size
    interpolation = _INTERPOLATION[preprocess.interpolation]
    if augment is None:
        steps: list = [EvalGeometry(preprocess), v2.ToImage()]  # EvalGeometry itself goes to a tensor for torchvision
    else:
        geometry = [
            v2.RandomResizedCrop(size, scale=(augment.scale_min, 1.0), interpolation=interpolation, antialias=True)
        ]
        if augment.hflip:
            geometry.append(v2.RandomHorizontalFlip())
        steps = [*geometry, v2.ToImage()] if preprocess.resize_backend == "pil" else [v2.ToImage(), *geometry]
        steps.extend(_photometric(augment, interpolation))
    return v2.Compose(
        [
            *steps,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)),
        ]
    )
