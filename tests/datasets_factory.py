"""Miniature datasets in the real on-disk layouts, for tests.

Each ``make_mini_*`` writes tiny but structurally faithful files into ``root`` and returns the
folder to use as ``data_root``:

- :func:`make_mini_mnist`          IDX files (plain or .gz; flat or torchvision's MNIST/raw/)
- :func:`make_mini_stanford_cars`  official devkit/.mat layout (what torchvision reads),
                                   the Kaggle nested mirror, or train/test class folders
- :func:`make_mini_imagefolder`    train/<class>/ + test/<class>/ trees
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

#: Real class names of the first Stanford Cars classes (in cars_meta.mat order).
CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
             "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001"]
#: Mini Stanford Cars images: (width, height), and the 1-based inclusive car box in each.
CAR_IMAGE_SIZE = (48, 36)
CAR_BOX = (13, 9, 36, 28)  # x1, y1, x2, y2 -> a 24 x 20 crop
CAR_BACKGROUND = (128, 128, 128)


def car_colour(label: int) -> tuple[int, int, int]:
    """The colour painted inside the box of every image of class ``label`` (0-based)."""
    palette = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (220, 200, 40), (200, 40, 200),
               (40, 200, 200)]
    return palette[label % len(palette)]


# ----------------------------------------------------------------------------- MNIST
def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0000 08 <ndim>, big-endian int32 dims)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def mnist_images(labels: np.ndarray, seed: int = 0, size: int = 28) -> np.ndarray:
    """(N, size, size) uint8: a bright bar whose row depends on the label, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(len(labels), size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 1 + int(label) * (size - 3) // 10
        images[i, row: row + 2, 2:-2] = 255
    return images


def make_mini_mnist(root: Path, n_train: int = 30, n_test: int = 10, *, gz: bool = False,
                    layout: str = "flat", seed: int = 0, size: int = 28) -> Path:
    """Write the four MNIST IDX files; returns the data_root to use.

    ``layout="flat"``: files directly in root. ``"torchvision"``: in root/MNIST/raw/ (the data
    root is still ``root``). Labels cycle 0..9 so every class appears when n >= 10.
    """
    root = Path(root)
    folder = root / "MNIST" / "raw" if layout == "torchvision" else root
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", mnist_images(labels, s, size), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return root


# ----------------------------------------------------------------------------- images
def write_jpeg(path: Path, size: tuple[int, int], colour: tuple[int, int, int],
               box: tuple[int, int, int, int] | None = None,
               box_colour: tuple[int, int, int] | None = None) -> Path:
    """A JPEG of ``size`` (w, h) filled with ``colour``; the 1-based inclusive ``box`` painted
    ``box_colour``."""
    img = Image.new("RGB", size, colour)
    if box is not None:
        x1, y1, x2, y2 = box
        img.paste(box_colour, (x1 - 1, y1 - 1, x2, y2))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95)
    return path


def _annotations(fnames: list[str], labels: list[int], with_class: bool) -> np.ndarray:
    """A 1 x N MATLAB struct array like the devkit's: bbox_x1..bbox_y2, class (1-based), fname.

    Numbers are stored as 1x1 uint8/uint16 matrices, as in the real files."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else [])
    annos = np.empty((1, len(fnames)), dtype=[(f, "O") for f in fields + ["fname"]])
    for i, (fname, label) in enumerate(zip(fnames, labels, strict=True)):
        for f, v in zip(fields[:4], CAR_BOX, strict=True):
            annos[0, i][f] = np.array([[v]], dtype=np.uint16)
        if with_class:
            annos[0, i]["class"] = np.array([[label + 1]], dtype=np.uint8)
        annos[0, i]["fname"] = np.array([fname])
    return annos


def _car_split(folder: Path, n_classes: int, per_class: int, start: int
               ) -> tuple[list[str], list[int]]:
    fnames, labels = [], []
    for i in range(n_classes * per_class):
        label = i % n_classes  # interleaved like the real files (not grouped by class)
        fname = f"{start + i:05d}.jpg"
        write_jpeg(folder / fname, CAR_IMAGE_SIZE, CAR_BACKGROUND, CAR_BOX, car_colour(label))
        fnames.append(fname)
        labels.append(label)
    return fnames, labels


def make_mini_stanford_cars(root: Path, layout: str = "official", n_classes: int = 3,
                            per_class: int = 2, test_per_class: int | None = None) -> Path:
    """A miniature Stanford Cars under ``root/stanford_cars``; returns that folder.

    layout "official": devkit/cars_meta.mat, devkit/cars_{train,test}_annos.mat,
    cars_test_annos_withlabels.mat, cars_train/, cars_test/ -- exactly what
    ``torchvision.datasets.StanfordCars(root)`` reads. "kaggle": as the common Kaggle mirror
    unpacks, images in cars_train/cars_train/ and cars_test/cars_test/, the devkit in
    car_devkit/devkit/ and the test labels as "cars_test_annos_withlabels (1).mat".
    "folders": train/<class name>/ and test/<class name>/. Each image is CAR_IMAGE_SIZE,
    grey with the CAR_BOX region painted ``car_colour(label)``.
    """
    if layout not in ("official", "kaggle", "folders"):
        raise ValueError(f"unknown layout {layout!r}")
    test_per_class = per_class if test_per_class is None else test_per_class
    base = Path(root) / "stanford_cars"
    names = (CAR_NAMES + [f"Car Model {i} 2012" for i in range(len(CAR_NAMES), n_classes)])
    names = names[:n_classes]
    if layout == "folders":
        for split, n in (("train", per_class), ("test", test_per_class)):
            for label, name in enumerate(names):
                for j in range(n):
                    write_jpeg(base / split / name / f"{j:05d}.jpg", CAR_IMAGE_SIZE,
                               CAR_BACKGROUND, CAR_BOX, car_colour(label))
        return base
    nest = layout == "kaggle"
    train_dir = base / "cars_train" / ("cars_train" if nest else "")
    test_dir = base / "cars_test" / ("cars_test" if nest else "")
    train = _car_split(train_dir, n_classes, per_class, start=1)
    test = _car_split(test_dir, n_classes, test_per_class, start=1)
    devkit = base / ("car_devkit/devkit" if nest else "devkit")
    devkit.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(devkit / "cars_meta.mat",
                     {"class_names": np.array([names], dtype=object)})
    scipy.io.savemat(devkit / "cars_train_annos.mat",
                     {"annotations": _annotations(*train, with_class=True)})
    scipy.io.savemat(devkit / "cars_test_annos.mat",
                     {"annotations": _annotations(*test, with_class=False)})
    labels_name = "cars_test_annos_withlabels" + (" (1)" if nest else "")
    scipy.io.savemat(base / f"{labels_name}.mat",
                     {"annotations": _annotations(*test, with_class=True)})
    return base


def make_mini_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "emu"),
                          per_class: int = 2, test_per_class: int | None = None,
                          size: tuple[int, int] = (40, 30), test_classes: tuple[str, ...] | None
                          = None) -> Path:
    """``root/train/<class>/`` and ``root/test/<class>/`` with solid-colour JPEGs (class i is
    ``car_colour(i)``); returns ``root``. ``test_classes`` lets a test make the splits differ.
    """
    root = Path(root)
    test_per_class = per_class if test_per_class is None else test_per_class
    for split, names, n in (("train", classes, per_class),
                            ("test", test_classes or classes, test_per_class)):
        for label, name in enumerate(names):
            for j in range(n):
                write_jpeg(root / split / name / f"img{j:03d}.jpg", size, car_colour(label))
    return root
