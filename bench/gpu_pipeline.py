"""Decoded images held on the GPU and augmented there: an input pipeline that keeps up with
an H200, compared in ``bench.gpu_check`` against JPEG decoding in DataLoader workers.

At ~6,000 training images/s a GPU outruns 16 CPU cores decoding JPEGs and running
RandomResizedCrop in PIL (~2-3k images/s). Stanford Cars is small (8,144 training images),
so every image is decoded once to a fixed square of uint8 pixels (256x256: 1.6 GB for the
whole split) and kept in GPU memory; each batch is then gathered, cropped, flipped,
resized and normalised by one ``grid_sample`` call.

Approximations against torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``:
crops are taken from the centre square of the image (resized so its shorter side is
``side``) rather than the whole picture, a crop side that would exceed the square is
clamped instead of re-drawn, and the resize is bilinear without antialiasing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: RandomResizedCrop's defaults: crop area as a fraction of the image, and aspect ratio.
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def centre_square(image: np.ndarray, side: int) -> np.ndarray:
    """(h, w, 3) uint8 with min(h, w) >= side -> its centre (side, side, 3)."""
    h, w = image.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


class GpuImageCache:
    """uint8 images (N, 3, side, side) and labels (N,) on one device, served as augmented
    float32 batches (B, 3, size, size) in channels_last, ImageNet-normalised."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, output_size: int,
                 seed: int = 0):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) uint8 images, got {tuple(images.shape)} "
                             f"{images.dtype}")
        self.images, self.labels, self.output_size = images, labels.to(images.device), output_size
        device = images.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        # (pixel / 255 - mean) / std folded into one multiply-add.
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std

    def __len__(self) -> int:
        return len(self.labels)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.empty(n, device=self.images.device).uniform_(low, high,
                                                                  generator=self.generator)

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        """Random resized crop + horizontal flip + normalise, one ``grid_sample`` for all."""
        n = len(batch)
        area = self._uniform(n, *CROP_AREA)
        ratio = torch.exp(self._uniform(n, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        # Crop width and height as fractions of the square's side.
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        centre_x = (1 - width) * self._uniform(n, 0, 1) + width / 2
        centre_y = (1 - height) * self._uniform(n, 0, 1) + height / 2
        flip = torch.where(self._uniform(n, 0, 1) < 0.5, -1.0, 1.0)
        # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1]:
        # x_in = flip * width * x_out + (2 * centre_x - 1), and likewise for y without flip.
        theta = torch.zeros(n, 2, 3, device=batch.device)
        theta[:, 0, 0] = flip * width
        theta[:, 0, 2] = 2 * centre_x - 1
        theta[:, 1, 1] = height
        theta[:, 1, 2] = 2 * centre_y - 1
        size = self.output_size
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        out = torch.addcmul(self.shift, out, self.scale)
        return out.contiguous(memory_format=torch.channels_last)

    def epoch(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass (the last batch may be smaller)."""
        order = torch.randperm(len(self), device=self.images.device, generator=self.generator)
        for start in range(0, len(self), batch_size):
            index = order[start:start + batch_size]
            yield self.augment(self.images[index]), self.labels[index]
