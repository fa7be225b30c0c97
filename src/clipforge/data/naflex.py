"""NaFlex images (SigLIP 2's variable resolution) as one tensor per image, so they travel like any pixel tensor.

A NaFlex image keeps its aspect ratio: it is resized to ``rows x cols`` patches of ``patch_size`` pixels, the
largest grid with ``rows * cols <= max_num_patches`` (:func:`naflex_grid`), cut into patches and padded with empty
patches up to ``max_num_patches``. transformers hands that to ``Siglip2VisionModel`` as three tensors:
``pixel_values`` (B, N, p * p * 3), ``pixel_attention_mask`` (B, N) and ``spatial_shapes`` (B, 2).

clipforge packs the three into one float32 tensor per image, (N, p * p * 3 + 3) (:func:`pack`):

* columns ``[0, p * p * 3)``: the patch's normalized pixels, flattened in (pixel row, pixel column, channel) order,
  patches in row-major order over the grid (transformers' order, so the patch embedding's weights apply as they
  are); zeros for padding patches;
* column ``p * p * 3``: 1 for a patch of the image, 0 for padding (``pixel_attention_mask``);
* the last two columns: the image's grid ``rows`` and ``cols`` (``spatial_shapes``), on every row.

Every image of a model has the same packed shape whatever its aspect ratio, so batches stack, loader workers,
devices, caches and the feature cache handle them as they handle (3, S, S) images, and :func:`unpack` gives
transformers' three tensors back. Grid sizes are small integers (at most ``max_num_patches``), exact in float32.
"""

from __future__ import annotations

import math

import torch

# transformers' search for the grid: bisection on the scale between EPS / 10 and 100 until the bracket is below
# EPS. The grid that comes out depends on where the bisection stops, so the same bounds and stopping rule give the
# same grid as its image processor on every image.
NAFLEX_SCALE_EPS = 1e-5
NAFLEX_MAX_SCALE = 100.0
EXTRA_COLUMNS = 3  # the mask and the grid's rows and columns


def packed_width(patch_size: int) -> int:
    """The number of columns of a packed NaFlex image: a patch's pixels (p * p * 3) and the three extra columns."""
    return patch_size * patch_size * 3 + EXTRA_COLUMNS


def naflex_grid(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """``(rows, cols)``: the patch grid a ``height`` x ``width`` image is resized to.

    For a scale s, each side becomes ``max(p, ceil(side * s / p) * p)`` pixels (whole patches, at least one); the
    scale is the largest whose grid holds at most ``max_num_patches`` patches, found by bisection as transformers'
    ``Siglip2ImageProcessor`` finds it (:data:`NAFLEX_SCALE_EPS`), so the aspect ratio is kept up to the rounding
    to whole patches.
    """

    def side(length: int, scale: float) -> int:
        return max(patch_size, math.ceil(length * scale / patch_size) * patch_size)

    def fits(scale: float) -> bool:
        return (side(height, scale) / patch_size) * (side(width, scale) / patch_size) <= max_num_patches

    low, high = NAFLEX_SCALE_EPS / 10, NAFLEX_MAX_SCALE
    while high - low >= NAFLEX_SCALE_EPS:
        middle = (low + high) / 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return side(height, low) // patch_size, side(width, low) // patch_size


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(3, rows * p, cols * p) pixels -> (rows * cols, p * p * 3) patches, row-major, each flattened in (pixel row,
    pixel column, channel) order."""
    channels, height, width = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    grid = pixels.reshape(channels, rows, patch_size, cols, patch_size)
    return grid.permute(1, 3, 2, 4, 0).reshape(rows * cols, patch_size * patch_size * channels)


def pack(patches: torch.Tensor, rows: int, cols: int, max_num_patches: int) -> torch.Tensor:
    """One image's ``rows * cols`` patches (rows * cols, p * p * 3) -> its packed (max_num_patches, p * p * 3 + 3)
    tensor (module docstring)."""
    count, width = patches.shape
    if count != rows * cols or count > max_num_patches:
        raise ValueError(f"{count} patches do not make a {rows} x {cols} grid within {max_num_patches} patches")
    packed = torch.zeros(max_num_patches, width + EXTRA_COLUMNS, dtype=torch.float32)
    packed[:count, :width] = patches
    packed[:count, width] = 1.0
    packed[:, width + 1] = rows
    packed[:, width + 2] = cols
    return packed


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of packed images (B, N, p * p * 3 + 3) -> transformers' ``(pixel_values (B, N, p * p * 3),
    pixel_attention_mask (B, N) int32, spatial_shapes (B, 2) int64)``."""
    if packed.ndim != 3 or packed.shape[-1] <= EXTRA_COLUMNS:
        raise ValueError(
            f"packed NaFlex images have shape (batch, max_num_patches, patch_size^2 * 3 + {EXTRA_COLUMNS}), got "
            f"{tuple(packed.shape)}; make them with the model's processor"
        )
    width = packed.shape[-1] - EXTRA_COLUMNS
    pixel_values = packed[..., :width]
    pixel_attention_mask = packed[..., width].round().to(torch.int32)
    spatial_shapes = packed[:, 0, width + 1 :].round().long()
    return pixel_values, pixel_attention_mask, spatial_shapes


def pack_batch(
    pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
) -> torch.Tensor:
    """transformers' three tensors -> packed images (B, N, p * p * 3 + 3): the inverse of :func:`unpack`."""
    batch, count, _ = pixel_values.shape
    shapes = spatial_shapes.to(torch.float32)[:, None, :].expand(batch, count, 2)
    mask = pixel_attention_mask.to(torch.float32)[..., None]
    return torch.cat([pixel_values.to(torch.float32), mask, shapes], dim=-1)
