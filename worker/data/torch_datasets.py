"""``torch.utils.data.Dataset`` objects for the torch engine. All are picklable (module-level
classes holding arrays, paths and torchvision Compose objects) so DataLoader workers work
under both fork and spawn."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from labctl.worker.data.samples import ImageSamples, open_rgb
from labctl.worker.data.transforms import resize_size, test_transform, train_transform
from labctl.worker.data.types import ArraySplit, TorchDatasets

if TYPE_CHECKING:
    from labctl.shared.spec import JobSpec

class ArrayImageDataset(Dataset):
    """Small in-memory datasets (digits, mnist, synthetic) for ResNet50.

    Holds the normalised (N, C, h, w) float32 arrays at native size; an item is the image
    repeated to 3 channels when grey and resized (bilinear, antialiased) to (3, S, S). No
    random crops: the images are tiny. Resizing per item keeps memory at native size
    (MNIST at 224 px would need 12 GB precomputed).
    """

    def __init__(self, split: ArraySplit, image_size: int):
        self.x, self.y, self.image_size = split.x, split.y, image_size

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        t = torch.from_numpy(np.ascontiguousarray(self.x[i]))
        if t.shape[0] == 1:
            t = t.repeat(3, 1, 1)
        if t.shape[1:] != (self.image_size, self.image_size):
            t = F.interpolate(t[None], size=(self.image_size, self.image_size),
                              mode="bilinear", align_corners=False, antialias=True)[0]
        return t.contiguous(), int(self.y[i])


class ImageFileDataset(Dataset):
    """Images decoded from their files on every access (cropped to the box if any).

    ``min_side``: decode JPEGs at a reduced scale no smaller than this (see ``open_rgb``);
    used for the test split, whose first step resizes the shorter side to that length anyway.
    Training keeps full resolution since RandomResizedCrop may zoom into a small region.
    """

    def __init__(self, samples: ImageSamples, transform, min_side: int | None = None):
        self.samples, self.transform, self.min_side = samples, transform, min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        box = None if self.samples.boxes is None else self.samples.boxes[i]
        image = open_rgb(self.samples.paths[i], box, min_side=self.min_side)
        return self.transform(image), int(self.samples.labels[i])


def build(spec: JobSpec) -> TorchDatasets:
    """Both torch datasets of ``spec``: in-memory arrays, or photos decoded per access (the
    ``stream`` data path; the ``cache`` one is device_batches.py)."""
    size = spec.effective_image_size
    if spec.dataset in ("digits", "mnist", "synthetic"):
        from labctl.worker.data import _load_arrays

        # Load at native size (normalised there) and resize per item to image_size.
        arrays = _load_arrays(spec, None)
        return TorchDatasets(ArrayImageDataset(arrays.train, size),
                             ArrayImageDataset(arrays.test, size), arrays.class_names)

    from labctl.worker.data.images import load_image_source

    source = load_image_source(spec)
    return TorchDatasets(ImageFileDataset(source.train, train_transform(size)),
                         ImageFileDataset(source.test, test_transform(size),
                                          min_side=resize_size(size)),
                         source.class_names)
