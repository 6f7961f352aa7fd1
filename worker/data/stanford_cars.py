"""Stanford Cars (196 classes; 8,144 train / 8,041 test images) in its three common layouts.

official  (what torchvision.datasets.StanfordCars reads, under ``<root>/stanford_cars``)::

    devkit/cars_meta.mat            class_names: 1 x 196 cell of str
    devkit/cars_train_annos.mat     annotations: 1 x N struct bbox_x1, bbox_y1, bbox_x2,
    devkit/cars_test_annos.mat                   bbox_y2, class (1-based), fname
    cars_test_annos_withlabels.mat  the test annotations with their class
    cars_train/00001.jpg ...        cars_test/00001.jpg ...

kaggle    the same .mat files, images nested one deeper: ``cars_train/cars_train/*.jpg``.
folders   ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.

``data_root`` may be the folder holding these or its parent (one level is searched).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io

from labctl.worker.data.imagefolder import has_class_folders, read_class_folders
from labctl.worker.data.samples import ImageSamples, ImageSource
from labctl.worker.engine import DataError

log = logging.getLogger(__name__)

FULL_CLASSES, FULL_TRAIN, FULL_TEST = 196, 8144, 8041
META, TRAIN_ANNOS = "cars_meta.mat", "cars_train_annos.mat"
TEST_ANNOS = "cars_test_annos_withlabels.mat"
#: Where each .mat file may sit relative to the dataset folder; the first is the canonical
#: place named in error messages ("car_devkit/devkit" is how the Kaggle mirror ships it).
MAT_PLACES = {
    META: ("devkit", ".", "car_devkit/devkit"),
    TRAIN_ANNOS: ("devkit", ".", "car_devkit/devkit"),
    TEST_ANNOS: (".", "devkit", "car_devkit/devkit"),
}
#: Other names a file ships under: the Kaggle mirror's test labels download as "... (1).mat".
MAT_ALIASES = {TEST_ANNOS: ("cars_test_annos_withlabels (1).mat",)}


def _has_mat_layout(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in
               ("devkit", "car_devkit", "cars_train", "cars_test", TEST_ANNOS,
                *MAT_ALIASES[TEST_ANNOS]))


def resolve_stanford_cars(root: str | Path) -> tuple[Path, str]:
    """(dataset folder, layout name) for ``root`` or the sub-folder of it that holds the data.

    Sub-folders named like the dataset ("stanford_cars", anything with "car") are tried first.
    """
    root = Path(root)
    candidates = [root]
    if root.is_dir():
        subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        candidates += sorted(subs, key=lambda p: ("car" not in p.name.lower(), p.name))
    for folder in candidates:
        if _has_mat_layout(folder):
            nested = (folder / "cars_train" / "cars_train").is_dir()
            return folder, "kaggle" if nested else "official"
        if has_class_folders(folder):
            return folder, "folders"
    raise DataError(
        f"expected Stanford Cars at {root} or one folder below it (e.g. {root / 'stanford_cars'}"
        f"): devkit/{META} with cars_train/ and cars_test/ (official or Kaggle layout), or "
        f"train/<class>/ and test/<class>/ folders")


def _find_mat(base: Path, name: str) -> Path:
    for place in MAT_PLACES[name]:
        for file_name in (name, *MAT_ALIASES.get(name, ())):
            path = base / place / file_name
            if path.is_file():
                return path
    where = base / MAT_PLACES[name][0]
    hint = ""
    if name == TEST_ANNOS and (base / "devkit" / "cars_test_annos.mat").is_file():
        hint = " (devkit/cars_test_annos.mat has no class labels, so it cannot replace it)"
    raise DataError(f"expected {name} at {where}{hint}")


def _images_dir(base: Path, split: str) -> Path:
    folder = base / f"cars_{split}"
    if (folder / f"cars_{split}").is_dir():  # the Kaggle mirror nests each folder
        return folder / f"cars_{split}"
    if not folder.is_dir():
        raise DataError(f"expected folder cars_{split}/ (the {split} images) at {base}")
    return folder


def _loadmat(path: Path, key: str) -> np.ndarray:
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for bad files
        raise DataError(f"cannot read {path.name} at {path.parent}: {exc}") from None
    if key not in mat:
        raise DataError(f"{path.name} at {path.parent} has no '{key}' variable")
    # squeeze_me turns a 1-element array into a scalar: put the dimension back.
    return np.atleast_1d(mat[key])


def read_class_names(base: Path) -> list[str]:
    names = [str(n).strip() for n in _loadmat(_find_mat(base, META), "class_names")]
    if len(names) != FULL_CLASSES:
        log.warning("Stanford Cars at %s has %d classes (the full set has %d)",
                    base, len(names), FULL_CLASSES)
    return names


def read_annotations(path: Path, images: Path, num_classes: int, crop_to_bbox: bool
                     ) -> ImageSamples:
    """One annotations .mat as samples with 0-based labels; every image must exist."""
    annos = _loadmat(path, "annotations")
    fields = set(annos.dtype.names or ())
    needed = {"fname", "class"} | ({"bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"}
                                   if crop_to_bbox else set())
    if not needed <= fields:
        raise DataError(f"{path.name} at {path.parent} lacks annotation fields "
                        f"{sorted(needed - fields)}")
    fnames = [str(f) for f in annos["fname"]]
    labels = np.asarray([int(c) for c in annos["class"]], dtype=np.int64) - 1  # 1-based on disk
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(f"{path.name} at {path.parent}: class {labels[bad[0]] + 1} of "
                        f"{fnames[bad[0]]} is outside 1..{num_classes} ({META})")
    present = {p.name for p in images.iterdir()}
    missing = [f for f in fnames if f not in present]
    if missing:
        raise DataError(f"expected {len(fnames)} images listed in {path.name} at {images}; "
                        f"{len(missing)} missing, e.g. {', '.join(missing[:5])}")
    boxes = None
    if crop_to_bbox:
        boxes = np.stack([np.asarray([int(v) for v in annos[k]], dtype=np.int64)
                          for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")], axis=1)
        # An inverted box would be clamped to a 1-pixel sliver and train as noise.
        inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
        if len(inverted):
            x1, y1, x2, y2 = boxes[inverted[0]].tolist()
            raise DataError(f"{path.name} at {path.parent}: the box of {fnames[inverted[0]]} "
                            f"is inverted (x {x1}..{x2}, y {y1}..{y2})")
    return ImageSamples([str(images / f) for f in fnames], labels, boxes)


def read_stanford_cars(root: str | Path, crop_to_bbox: bool = False) -> ImageSource:
    """Both splits of Stanford Cars found at or below ``root``, checked against the disk."""
    base, layout = resolve_stanford_cars(root)
    if layout == "folders":
        if crop_to_bbox:
            raise DataError(f"crop_to_bbox needs the annotation files (devkit/{TRAIN_ANNOS}); "
                            f"{base} holds class folders without boxes")
        source = read_class_folders(base)
    else:
        names = read_class_names(base)
        # Resolve every file first so one message names the first missing piece.
        train_annos, test_annos = _find_mat(base, TRAIN_ANNOS), _find_mat(base, TEST_ANNOS)
        train_dir, test_dir = _images_dir(base, "train"), _images_dir(base, "test")
        source = ImageSource(
            read_annotations(train_annos, train_dir, len(names), crop_to_bbox),
            read_annotations(test_annos, test_dir, len(names), crop_to_bbox),
            names, base)
    counts = (len(source.train), len(source.test))
    if len(source.class_names) == FULL_CLASSES and counts != (FULL_TRAIN, FULL_TEST):
        log.warning("Stanford Cars at %s (%s layout) has %d train / %d test images; the full "
                    "set has %d / %d", base, layout, *counts, FULL_TRAIN, FULL_TEST)
    log.info("Stanford Cars: %s layout at %s, %d classes, %d train / %d test images",
             layout, base, len(source.class_names), *counts)
    return source
