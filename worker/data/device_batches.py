"""Decoded uint8 images held on the job's device and turned into training batches there.

At several thousand training images/s a GPU outruns any number of CPU cores decoding JPEGs
and running RandomResizedCrop in PIL. So every image is decoded once (cache.py) and the
whole split is copied to the device as uint8; each batch is then gathered, cropped, flipped,
resized and ImageNet-normalised by a handful of batched tensor ops on that device (the GPU
for CUDA jobs; the same code runs on the CPU).

Against torchvision's ``RandomResizedCrop(antialias=True)`` + ``RandomHorizontalFlip`` on
the full-resolution photo: the crop rectangles follow the same distribution (crops.py; the
statistical test is tests/test_device_augment.py), drawn on the cached image whose shorter
side is ``resize_size(S)``; the resize is bilinear without antialiasing (a crop is shrunk
by at most ~1.7x at 224 px, where the difference is small). Evaluation crops the centre
S x S of the cached image, i.e. torchvision's ``Resize(S*256/224)`` + ``CenterCrop(S)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from labctl.worker.data.cache import DecodedImages
from labctl.worker.data.crops import centre_crops, random_resized_crops
from labctl.worker.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class DeviceImages:
    """N variable-size RGB images in one flat tensor.

    pixels: (P, 3) uint8 on the device, every image's rows one after another (HWC order).
    offsets: (N,) int64 on the device, the first pixel of each image in ``pixels``.
    heights, widths: (N,) int64 on the CPU, where the crop rectangles are drawn.
    """

    def __init__(self, pixels: torch.Tensor, offsets: torch.Tensor, heights: torch.Tensor,
                 widths: torch.Tensor):
        self.pixels, self.offsets = pixels, offsets.to(pixels.device)
        self.heights, self.widths = heights.cpu(), widths.cpu()

    @classmethod
    def from_decoded(cls, decoded: DecodedImages, device: torch.device) -> DeviceImages:
        data, index = decoded.arrays()
        with warnings.catch_warnings():
            # A read-only memory map: torch warns that writes would fail; nothing writes.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(data)
        index_t = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        pixels = flat.view(-1, 3).to(device)
        return cls(pixels, index_t[:, 0] // 3, index_t[:, 1], index_t[:, 2])

    def __len__(self) -> int:
        return len(self.heights)

    @property
    def nbytes(self) -> int:
        return self.pixels.numel()


class Normaliser:
    """uint8 value -> (value / 255 - mean) / std, folded into one multiply-add per channel."""

    def __init__(self, device: torch.device):
        std = torch.tensor(IMAGENET_STD, device=device)
        mean = torch.tensor(IMAGENET_MEAN, device=device)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std

    def __call__(self, hwc: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, hwc, self.scale)


def resized_crops(images: DeviceImages, which: torch.Tensor, boxes: torch.Tensor,
                  flips: torch.Tensor | None, size: int, normalise: Normaliser) -> torch.Tensor:
    """Crop ``boxes`` out of images ``which``, resize each crop to ``size`` x ``size``
    (bilinear, half-pixel centres like ``align_corners=False``, edges clamped inside the crop),
    mirror those with ``flips``, and normalise.

    which: (B,) int64 image indices; boxes: (B, 4) int64 (top, left, height, width) on the
    CPU; flips: (B,) bool or None. Returns (B, 3, size, size) float32 in channels_last.
    """
    device = images.pixels.device
    boxes = boxes.to(device, non_blocking=True).double()
    top, left, height, width = boxes.unbind(1)
    steps = (torch.arange(size, device=device, dtype=torch.float64) + 0.5) / size  # (S,)
    src_y = top[:, None] + steps[None] * height[:, None] - 0.5  # (B, S)
    src_x = left[:, None] + steps[None] * width[:, None] - 0.5
    if flips is not None:
        # A mirrored crop's column j reads where the unmirrored one's column S-1-j does.
        src_x = torch.where(flips.to(device)[:, None], src_x.flip(1), src_x)
    y0, y1, wy = _taps(src_y, top, height)
    x0, x1, wx = _taps(src_x, left, width)

    rows = images.offsets[which.to(device)][:, None]  # (B, 1)
    row_w = images.widths.to(device)[which.to(device)][:, None]
    pixels = images.pixels

    def tap(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        flat = (rows + y * row_w)[:, :, None] + x[:, None, :]  # (B, S, S)
        # index_select: about twice as fast as pixels[flat] on a CPU, the same on a GPU.
        return pixels.index_select(0, flat.view(-1)).view(*flat.shape, 3).float()

    wy4 = wy.float()[:, :, None, None]
    wx4 = wx.float()[:, None, :, None]
    upper = torch.lerp(tap(y0, x0), tap(y0, x1), wx4)
    lower = torch.lerp(tap(y1, x0), tap(y1, x1), wx4)
    hwc = normalise(torch.lerp(upper, lower, wy4))
    # (B, S, S, 3) seen as (B, 3, S, S) is already the channels_last layout.
    return hwc.permute(0, 3, 1, 2)


def _taps(src: torch.Tensor, start: torch.Tensor, extent: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source coordinates (B, S) -> the two neighbouring pixel indices and the weight of the
    second, clamped to the crop [start, start + extent - 1] as PIL resizes a cropped image."""
    lo, hi = start[:, None], (start + extent - 1)[:, None]
    src = torch.maximum(torch.minimum(src, hi), lo)
    first = src.floor()
    weight = src - first
    second = torch.minimum(first + 1, hi)
    return first.long(), second.long(), weight


class DeviceBatches:
    """One split as batches on the device: iterate for an epoch of
    ``(images (B, 3, S, S) float32 channels_last, labels (B,) int64)``.

    ``train``: shuffled, RandomResizedCrop + horizontal flip, all drawn from ``generator``
    (a CPU generator the engine checkpoints). Otherwise in order, centre crops.
    """

    def __init__(self, images: DeviceImages, labels: np.ndarray, size: int, batch_size: int,
                 train: bool, generator: torch.Generator | None = None,
                 drop_last: bool = False, memory_format: torch.memory_format =
                 torch.channels_last):
        if train and generator is None:
            raise ValueError("a training split needs the generator its crops are drawn from")
        self.images, self.size, self.batch_size = images, size, batch_size
        self.labels = torch.as_tensor(np.asarray(labels, np.int64)).to(images.pixels.device)
        self.train, self.generator, self.drop_last = train, generator, drop_last
        self.memory_format = memory_format
        self.normalise = Normaliser(images.pixels.device)
        self._centre = None if train else centre_crops(images.heights, images.widths, size)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            which = order[start:start + self.batch_size]
            if self.train:
                boxes = random_resized_crops(self.images.heights[which],
                                             self.images.widths[which], self.generator)
                flips = torch.rand(len(which), generator=self.generator) < 0.5
            else:
                boxes, flips = self._centre[which], None
            batch = resized_crops(self.images, which, boxes, flips, self.size, self.normalise)
            if self.memory_format != torch.channels_last:
                batch = batch.contiguous(memory_format=self.memory_format)
            yield batch, self.labels[which.to(self.labels.device)]
