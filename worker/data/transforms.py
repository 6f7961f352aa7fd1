"""Image transforms for the torch engine (torchvision is imported only when used)."""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Shorter side before the test centre crop: the usual 256/224 ratio."""
    return int(image_size * 256 / 224)


def train_transform(image_size: int):
    """PIL image -> (3, S, S) float32: RandomResizedCrop + horizontal flip, ImageNet norm."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_transform(image_size: int):
    """PIL image -> (3, S, S) float32: Resize(S*256/224) + CenterCrop(S), ImageNet norm."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(resize_size(image_size), antialias=True),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """(h, w, C) -> (size, size, C), the centre; h and w must be >= size."""
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top: top + size, left: left + size]


def imagenet_normalise(batch: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 with ImageNet mean/std."""
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[None, :, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
