"""Class-per-folder trees: ``<root>/train/<class>/*.jpg`` and ``<root>/test/<class>/*.jpg``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labctl.worker.data.samples import IMAGE_EXTENSIONS, ImageSamples, ImageSource, list_images
from labctl.worker.engine import DataError


def scan_split(folder: Path) -> tuple[list[str], ImageSamples]:
    """(class names = sorted sub-folder names, samples) of one split folder."""
    if not folder.is_dir():
        raise DataError(f"expected folder {folder.name}/ (one sub-folder per class) at "
                        f"{folder.parent}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"expected one sub-folder per class in {folder}, found none")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = list_images(folder / name)
        if not files:
            raise DataError(f"expected images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in "
                            f"class folder {name}/ at {folder}, found none")
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    return classes, ImageSamples(paths, np.asarray(labels, dtype=np.int64))


def read_class_folders(base: Path) -> ImageSource:
    """Both splits of ``base/train`` and ``base/test``; their class folders must match."""
    train_classes, train = scan_split(base / "train")
    test_classes, test = scan_split(base / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"class folders differ between train/ and test/ at {base}: "
                        f"only in train: {only_train[:10]}, only in test: {only_test[:10]}")
    return ImageSource(train, test, train_classes, base)


def has_class_folders(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def resolve_imagefolder(root: str | Path) -> Path:
    """``root`` if it holds train/ or test/, else its only sub-folder that does."""
    root = Path(root)
    if has_class_folders(root):
        return root
    if root.is_dir():
        found = sorted(p for p in root.iterdir() if p.is_dir() and has_class_folders(p))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(f"expected train/ and test/ at {root}; several sub-folders hold "
                            f"them ({', '.join(p.name for p in found)}): point data_root at one")
    raise DataError(f"expected folders train/ and test/ (one sub-folder per class) at {root}")


def read_imagefolder(root: str | Path) -> ImageSource:
    return read_class_folders(resolve_imagefolder(root))
