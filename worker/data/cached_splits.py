"""Both splits of a photo dataset decoded once and placed on the job's device, or None when
the job streams its JPEGs instead (data_path.py decides)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from labctl.worker.data.cache import cache_dir_for, decode_images, is_cached
from labctl.worker.data.data_path import choose_data_path
from labctl.worker.data.device_batches import DeviceImages
from labctl.worker.data.transforms import resize_size

if TYPE_CHECKING:
    from labctl.shared.spec import JobSpec


@dataclass
class CachedSplits:
    """uint8 images on the device at shorter side ``resize_size(image_size)``; labels (N,)
    int64 on the CPU."""

    train: DeviceImages
    train_labels: np.ndarray
    test: DeviceImages
    test_labels: np.ndarray
    class_names: list[str]


def open_cached_splits(spec: JobSpec, device: torch.device) -> CachedSplits | None:
    from labctl.shared.settings import get_settings
    from labctl.shared.spec import PHOTO_DATASETS
    from labctl.worker.data.images import load_image_source

    if spec.dataset not in PHOTO_DATASETS:
        return None
    source = load_image_source(spec)
    short = resize_size(spec.effective_image_size)
    cache_dir = cache_dir_for(source.root)
    cached = all(is_cached(split, short, cache_dir) for split in (source.train, source.test))
    choice = choose_data_path(spec, len(source.train) + len(source.test), short, device,
                              cache_dir, get_settings().data_cache_max_gb, cached)
    if choice.mode == "stream":
        return None
    train = DeviceImages.from_decoded(decode_images(source.train, short, cache_dir), device)
    test = DeviceImages.from_decoded(decode_images(source.test, short, cache_dir), device)
    return CachedSplits(train, source.train.labels, test, source.test.labels,
                        source.class_names)
