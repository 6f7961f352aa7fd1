"""Dataset loaders for both engines.

``load_arrays(spec)`` gives in-memory float32 NCHW arrays (the NumPy engine);
``build_torch_datasets(spec)`` gives picklable ``torch.utils.data.Dataset`` objects yielding
``(image (3, S, S) float32, int label)`` (the torch engine). Missing or malformed files raise
:class:`worker.engine.DataError` naming the file and where it was expected.

Channels and normalisation per dataset (load_arrays):
  digits     (N, 1, S, S)  [0,1] then train-split mean/std
  mnist      (N, 1, S, S)  [0,1] then the usual MNIST mean/std (0.1307, 0.3081)
  synthetic  (N, 3, S, S)  zero mean / unit std from the train split
  stanford-cars, imagefolder  (N, 3, S, S)  ImageNet mean/std, resize shorter side + centre crop
Torch datasets use the same arrays for digits/mnist/synthetic (grey repeated to 3 channels,
resized per item to S); file datasets get RandomResizedCrop+flip (train) and
Resize(S*256/224)+CenterCrop (test) with ImageNet normalisation.

Decode cache (cache.py): Stanford Cars / imagefolder are decoded once, in parallel, into
``<dataset folder>/.labctl-cache`` (else ``<artifacts root>/.decode-cache``, or
``$LABCTL_DATA_CACHE_DIR``; "off" disables), keyed on the files and the size; later jobs
memory-map the pixels. ``load_arrays`` always uses it. ResNet50 jobs use it by default
(``spec.data_path`` auto/cache, data_path.py): ``open_cached_splits`` puts the uint8 images
on the job's device and device_batches.py crops, flips and normalises whole batches there,
so GPU epochs do not wait on JPEG decoding. ``data_path: stream`` (or auto over budget)
uses the torch datasets, decoding JPEGs every epoch in DataLoader workers.

Memory (memory.py): every loader applies the limits first, then refuses with the estimate
(``DataError``) a dataset whose float32 arrays would not fit in the memory this host has
available, before allocating them.

Modules: types (containers), subset (seeded limits), memory, arrays (digits, synthetic, resize),
mnist (IDX files), samples (file lists, opening images), stanford_cars, imagefolder,
images (file datasets -> arrays), cache, transforms, torch_datasets, data_path (cache or
stream), crops (crop rectangles per batch), device_batches (augmentation on the device),
cached_splits, predict_inputs (a user's image files preprocessed as a job's test split, for
``labctl predict``), validation (the validation split that replaces the test split when
``spec.validation`` is set).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.shared.spec import PHOTO_DATASETS  # read as image files (images.py)
from labctl.worker.data.types import ArrayDataset, ArraySplit, TorchDatasets

if TYPE_CHECKING:
    from labctl.shared.spec import JobSpec
    from labctl.worker.data.cached_splits import CachedSplits

__all__ = ["ArrayDataset", "ArraySplit", "TorchDatasets", "build_torch_datasets",
           "dataset_class_names", "load_arrays", "open_cached_splits"]


def load_arrays(spec: JobSpec) -> ArrayDataset:
    """The dataset of ``spec`` as normalised float32 arrays at ``spec.effective_image_size``."""
    return _load_arrays(spec, spec.effective_image_size)


def _load_arrays(spec: JobSpec, image_size: int | None) -> ArrayDataset:
    """``image_size=None``: the dataset's native size (digits 8, mnist 28, synthetic 32).

    With ``spec.validation``, ``test`` is the validation split carved from the training
    split (validation.py) and the training split is what is left of it.
    """
    dataset = _load_all_arrays(spec, image_size)
    # Photo datasets carve theirs from the file list (images.py), before decoding.
    if spec.validation is None or spec.dataset in PHOTO_DATASETS:
        return dataset
    from labctl.worker.data.validation import validation_indices

    kept, held_out = validation_indices(dataset.train.y, spec.validation)
    train = dataset.train
    return ArrayDataset(ArraySplit(train.x[kept], train.y[kept]),
                        ArraySplit(train.x[held_out], train.y[held_out]), dataset.class_names)


def _load_all_arrays(spec: JobSpec, image_size: int | None) -> ArrayDataset:
    if image_size is None and spec.dataset in ("digits", "synthetic"):
        from labctl.shared.spec import NATIVE_IMAGE_SIZE

        image_size = NATIVE_IMAGE_SIZE[spec.dataset]
    kw = dict(limit_train=spec.limit_train, limit_test=spec.limit_test, seed=spec.seed)
    if spec.dataset == "digits":
        from labctl.worker.data.arrays import load_digits_arrays

        return load_digits_arrays(image_size, **kw)
    if spec.dataset == "synthetic":
        from labctl.worker.data.arrays import load_synthetic_arrays

        return load_synthetic_arrays(image_size, spec.effective_num_classes, **kw)
    if spec.dataset == "mnist":
        from labctl.worker.data.mnist import load_mnist_arrays, load_mnist_raw

        if image_size is None:
            return load_mnist_raw(_root(spec), **kw)
        return load_mnist_arrays(_root(spec), image_size, **kw)
    from labctl.worker.data.images import load_image_arrays

    return load_image_arrays(spec)


def dataset_class_names(spec: JobSpec) -> list[str]:
    """The class list of ``spec``'s dataset (index = label), reading no pixels of a file
    dataset: its folder listing or devkit names the classes."""
    if spec.dataset in ("stanford-cars", "imagefolder"):
        from labctl.worker.data.images import load_image_source

        return load_image_source(spec).class_names
    return _load_arrays(spec, None).class_names


def build_torch_datasets(spec: JobSpec) -> TorchDatasets:
    """Torch datasets for ``spec`` (both splits, with their transforms)."""
    from labctl.worker.data.torch_datasets import build

    return build(spec)


def open_cached_splits(spec: JobSpec, device) -> CachedSplits | None:
    """A photo dataset decoded once onto ``device``; None when ``spec`` streams instead."""
    from labctl.worker.data.cached_splits import open_cached_splits as open_splits

    return open_splits(spec, device)


def _root(spec: JobSpec) -> str:
    from labctl.worker.engine import DataError

    if not spec.data_root:
        raise DataError(f"dataset {spec.dataset!r} needs data_root (set LABCTL_DATA_DIR)")
    return spec.data_root
