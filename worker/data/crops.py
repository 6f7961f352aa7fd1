"""Crop rectangles for whole batches: torchvision's RandomResizedCrop and CenterCrop
parameters, drawn for N images at once instead of one Python call per image.

A rectangle is (top, left, height, width) in the image's own pixels, as torchvision's
``get_params`` returns it. Randomness comes from one CPU ``torch.Generator`` (the engine's
checkpointed loader generator), so a resumed job draws the same crops.
"""

from __future__ import annotations

import math

import torch

#: RandomResizedCrop's defaults: crop area as a fraction of the image, and aspect ratio.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: torchvision tries this many draws before falling back to a centre crop.
ATTEMPTS = 10


def random_resized_crops(heights: torch.Tensor, widths: torch.Tensor,
                         generator: torch.Generator, scale: tuple[float, float] = CROP_SCALE,
                         ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """(N,) int64 image heights and widths -> (N, 4) int64 (top, left, height, width).

    The same algorithm as ``torchvision.transforms.RandomResizedCrop.get_params``: up to
    ten (area, log-aspect) draws, the first that fits wins, else the centre crop clamped to
    the ratio range. All ten draws are made for every image (a fixed number of random
    numbers per batch keeps the stream position independent of the images' sizes).
    """
    n = len(heights)
    h_img, w_img = heights.double(), widths.double()
    area = (h_img * w_img)[:, None]
    target = area * torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(
        scale[0], scale[1], generator=generator)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(
        log_lo, log_hi, generator=generator))
    # torch.round rounds half to even, as Python's round() in get_params does.
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = torch.where(fits.any(dim=1), fits.long().argmax(dim=1), -1)
    offsets = torch.rand(n, 2, generator=generator, dtype=torch.float64)

    rows = torch.arange(n)
    pick = first.clamp(min=0)
    crop_h, crop_w = h[rows, pick], w[rows, pick]
    # randint(0, H - h + 1) as a uniform integer from one float draw.
    top = (offsets[:, 0] * (heights - crop_h + 1)).floor().long()
    left = (offsets[:, 1] * (widths - crop_w + 1)).floor().long()

    fallback_h, fallback_w = _fallback_sizes(heights, widths, ratio)
    use_fallback = first < 0
    crop_h = torch.where(use_fallback, fallback_h, crop_h)
    crop_w = torch.where(use_fallback, fallback_w, crop_w)
    top = torch.where(use_fallback, (heights - crop_h) // 2, top)
    left = torch.where(use_fallback, (widths - crop_w) // 2, left)
    return torch.stack([top, left, crop_h, crop_w], dim=1)


def _fallback_sizes(heights: torch.Tensor, widths: torch.Tensor,
                    ratio: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    in_ratio = widths.double() / heights.double()
    lo, hi = min(ratio), max(ratio)
    h = torch.where(in_ratio < lo, torch.round(widths / lo).long(), heights)
    w = torch.where(in_ratio > hi, torch.round(heights * hi).long(), widths)
    return h, w


def centre_crops(heights: torch.Tensor, widths: torch.Tensor, size: int) -> torch.Tensor:
    """(N,) heights and widths (each >= size) -> (N, 4) int64 (top, left, size, size), the
    offsets torchvision's ``CenterCrop`` uses: ``int(round((H - size) / 2))``."""
    top = torch.round((heights - size).double() / 2).long()
    left = torch.round((widths - size).double() / 2).long()
    side = torch.full_like(top, size)
    return torch.stack([top, left, side, side], dim=1)
