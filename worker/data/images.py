"""File datasets (Stanford Cars, imagefolder): finding the samples, and decoding to arrays."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from labctl.worker.data.cache import cache_dir_for, decode_images
from labctl.worker.data.memory import check_fits
from labctl.worker.data.samples import ImageSamples, ImageSource
from labctl.worker.data.subset import TEST_STREAM, TRAIN_STREAM
from labctl.worker.data.transforms import centre_crop, imagenet_normalise
from labctl.worker.data.types import ArrayDataset, ArraySplit
from labctl.worker.data.validation import validation_indices

if TYPE_CHECKING:
    from labctl.shared.spec import JobSpec

#: Images converted to float per chunk, bounding the temporary uint8 copies.
CHUNK = 512


def load_image_source(spec: JobSpec) -> ImageSource:
    """The (limit-subsetted) samples of spec.dataset under spec.data_root."""
    from labctl.worker.engine import DataError

    if not spec.data_root:
        raise DataError(f"dataset {spec.dataset!r} needs data_root (set LABCTL_DATA_DIR)")
    if spec.dataset == "stanford-cars":
        from labctl.worker.data.stanford_cars import read_stanford_cars

        source = read_stanford_cars(spec.data_root, crop_to_bbox=spec.crop_to_bbox)
    elif spec.dataset == "imagefolder":
        from labctl.worker.data.imagefolder import read_imagefolder

        source = read_imagefolder(spec.data_root)
    else:
        raise ValueError(f"{spec.dataset} is not a file-of-images dataset")
    train = source.train.subset(spec.limit_train, spec.seed, TRAIN_STREAM)
    if spec.validation is not None:
        # The validation images take the test split's place (and its transforms); the test
        # files are not read at all.
        kept, held_out = validation_indices(train.labels, spec.validation)
        return ImageSource(train.take(kept), train.take(held_out), source.class_names,
                           source.root)
    return ImageSource(train, source.test.subset(spec.limit_test, spec.seed, TEST_STREAM),
                       source.class_names, source.root)


def decode_split(samples: ImageSamples, size: int, cache_dir: Path | None) -> ArraySplit:
    """Every image: shorter side resized to ``size``, centre-cropped to a square, ImageNet
    normalised -> x (N, 3, size, size) float32. ``cache_dir``: see ``cache.decode_images``."""
    decoded = decode_images(samples, size, cache_dir)
    x = np.empty((len(samples), 3, size, size), dtype=np.float32)
    for start in range(0, len(samples), CHUNK):
        stop = min(start + CHUNK, len(samples))
        batch = np.stack([centre_crop(decoded[i], size) for i in range(start, stop)])
        x[start:stop] = imagenet_normalise(batch)
    return ArraySplit(x, samples.labels.astype(np.int64))


def load_image_arrays(spec: JobSpec) -> ArrayDataset:
    source = load_image_source(spec)
    size = spec.effective_image_size
    cache_dir = cache_dir_for(source.root)
    check_fits(spec.dataset, len(source.train), len(source.test), 3, size)
    return ArrayDataset(decode_split(source.train, size, cache_dir),
                        decode_split(source.test, size, cache_dir), source.class_names)
