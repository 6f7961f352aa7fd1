"""The containers every loader returns, shared by both engines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ArraySplit:
    """One split held in memory.

    x: (N, C, H, W) float32, already normalised (roughly zero mean, unit variance).
    y: (N,) int64 class indices in [0, num_classes).
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"bad split shapes x={self.x.shape} y={self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class ArrayDataset:
    """Both splits plus the class list. ``num_classes`` counts every class, even those a
    ``limit_*`` subset happens to leave out, so model heads keep the dataset's width."""

    train: ArraySplit
    test: ArraySplit
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[2])


@dataclass
class TorchDatasets:
    """``train`` / ``test`` are ``torch.utils.data.Dataset`` objects yielding
    ``(image (3, S, S) float32 tensor, int label)``; both are picklable."""

    train: object
    test: object
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
