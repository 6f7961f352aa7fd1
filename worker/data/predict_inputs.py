"""A user's own image files, preprocessed as the job's test split was (``labctl predict``).

Each function follows one loader and calls its steps, so a photo reaches the network the
way a test image of the job's dataset did:

  numpy-cnn  digits, mnist: grey, [0, 1], resized to the dataset's native side, then to
             image_size and normalised with the dataset's statistics (``load_arrays``)
             stanford-cars, imagefolder: RGB, shorter side to S, centre crop, ImageNet
             mean/std (``images.decode_split``)
  resnet50   digits, mnist: the same grey arrays at native side, then ``ArrayImageDataset``
             (repeated to 3 channels, resized per item to S)
             stanford-cars, imagefolder: ``ImageFileDataset`` with ``test_transform``
             (Resize(S*256/224) + CenterCrop(S), ImageNet mean/std)

The grey datasets are square and nothing of a digit may be cropped away, so a non-square
image is resized whole (its aspect ratio is not kept). Their digits are light on a dark
background; a scan of dark ink on paper needs inverting first. Synthetic data has no image
form (its pixels are class patterns plus Gaussian noise), so it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from labctl.shared.spec import NATIVE_IMAGE_SIZE
from labctl.worker.data.arrays import digits_normalisation, normalise, resize_images
from labctl.worker.data.images import decode_split
from labctl.worker.data.mnist import MNIST_MEAN, MNIST_STD
from labctl.worker.data.samples import ImageSamples, open_image
from labctl.worker.data.types import ArraySplit
from labctl.worker.engine import DataError

if TYPE_CHECKING:
    from labctl.shared.spec import JobSpec

#: Datasets of one-channel images; the others are RGB.
GREY_DATASETS = frozenset({"digits", "mnist"})


def pixel_normalisation(dataset: str, image_size: int) -> tuple[float, float]:
    """(mean, std) the grey dataset's loader normalises [0, 1] pixels with at that size."""
    if dataset == "digits":
        return digits_normalisation(image_size)
    return MNIST_MEAN, MNIST_STD


def grey_arrays(dataset: str, paths: Sequence[str], image_size: int) -> np.ndarray:
    """(N, 1, image_size, image_size) float32, as ``_load_arrays(spec, image_size)`` gives a
    test image of ``dataset`` (digits or mnist)."""
    native = NATIVE_IMAGE_SIZE[dataset]
    pixels = np.concatenate([
        resize_images(np.asarray(open_image(path, "L"), np.float32)[None, None] / 255.0, native)
        for path in paths])
    mean, std = pixel_normalisation(dataset, image_size)
    return normalise(resize_images(pixels, image_size), mean, std)


def numpy_inputs(spec: JobSpec, paths: Sequence[str]) -> np.ndarray:
    """The NumPy engine's input for ``paths``: (N, C, S, S) float32, like
    ``load_arrays(spec).test.x``."""
    _refuse_generated(spec)
    if spec.dataset in GREY_DATASETS:
        return grey_arrays(spec.dataset, paths, spec.effective_image_size)
    # No decode cache: a user's photos are read once.
    return decode_split(_samples(paths), spec.effective_image_size, cache_dir=None).x


def torch_inputs(spec: JobSpec, paths: Sequence[str]):
    """The torch engine's test dataset for ``paths``: items are (image (3, S, S) float32
    tensor, 0), like ``build_torch_datasets(spec).test`` without the decode cache."""
    from labctl.worker.data.torch_datasets import ArrayImageDataset, ImageFileDataset
    from labctl.worker.data.transforms import resize_size, test_transform

    _refuse_generated(spec)
    size = spec.effective_image_size
    if spec.dataset in GREY_DATASETS:
        # Normalised at native size, as build() loads them; resized per item to S.
        native = grey_arrays(spec.dataset, paths, NATIVE_IMAGE_SIZE[spec.dataset])
        return ArrayImageDataset(ArraySplit(native, np.zeros(len(paths), np.int64)), size)
    return ImageFileDataset(_samples(paths), test_transform(size), min_side=resize_size(size))


def _samples(paths: Sequence[str]) -> ImageSamples:
    return ImageSamples([str(p) for p in paths], np.zeros(len(paths), np.int64))


def _refuse_generated(spec: JobSpec) -> None:
    if spec.dataset == "synthetic":
        raise DataError("a synthetic-data job has no image form to predict: its images are "
                        "generated arrays, not pictures")
