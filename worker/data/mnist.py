"""MNIST from the standard IDX files (plain or .gz, flat or in torchvision's MNIST/raw/)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from labctl.worker.data.arrays import normalise, resize_images, take
from labctl.worker.data.memory import check_fits
from labctl.worker.data.subset import TEST_STREAM, TRAIN_STREAM
from labctl.worker.data.types import ArrayDataset, ArraySplit
from labctl.worker.engine import DataError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Sub-folders searched under data_root, in order; "MNIST/raw" is torchvision's layout.
SUBDIRS = ("", "MNIST/raw", "raw", "mnist", "mnist/raw")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
#: The customary MNIST statistics on [0, 1] pixels.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def find_idx_file(root: Path, name: str) -> Path:
    """The file ``name`` or ``name.gz`` under root or one of :data:`SUBDIRS`.

    Also accepts the common ``train-images.idx3-ubyte`` spelling (a dot before ``idx``).
    """
    dotted = name.replace("-idx", ".idx")
    for sub in SUBDIRS:
        folder = root / sub if sub else root
        for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
            path = folder / candidate
            if path.is_file():
                return path
    raise DataError(f"expected {name} (or {name}.gz) at {root} or {root / 'MNIST' / 'raw'}")


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes into a uint8 array of ``ndim`` dimensions.

    IDX header: big-endian int32 magic (0x0000 08 <ndim>), then one int32 per dimension.
    Raises DataError naming the file when the magic, dimension count or size is wrong.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path.name} at {path.parent}: {exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path.name} at {path.parent} is truncated ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path.name} at {path.parent} is not an IDX file of {ndim}-D unsigned "
                        f"bytes: magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path.name} at {path.parent} has {len(data)} bytes; its header "
                        f"(dims {dims}) says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int64) of "train" or "test"."""
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = find_idx_file(root, img_name), find_idx_file(root, lbl_name)
    if img_path.parent != lbl_path.parent:  # images of one copy with labels of another
        raise DataError(f"{img_path.name} is at {img_path.parent} but {lbl_path.name} is at "
                        f"{lbl_path.parent}: keep one copy of MNIST under {root}")
    images = read_idx(img_path, IMAGES_MAGIC, 3)
    labels = read_idx(lbl_path, LABELS_MAGIC, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{img_path.name} holds {len(images)} images but {lbl_path.name} "
                        f"holds {len(labels)} labels (both at {img_path.parent})")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{lbl_path.name} at {lbl_path.parent} has label {labels.max()} > 9")
    return images, labels


def load_mnist_raw(root: str | Path, limit_train: int | None = None,
                   limit_test: int | None = None, seed: int = 0, *,
                   final_size: int | None = None) -> ArrayDataset:
    """MNIST at native 28x28, normalised, subset: x (N, 1, 28, 28) float32.
    ``final_size``: the size the caller will resize to, for the memory check."""
    root = Path(root)
    raw = {}
    for split, limit, stream in (("train", limit_train, TRAIN_STREAM),
                                 ("test", limit_test, TEST_STREAM)):
        images, labels = read_mnist_split(root, split)
        # Subset before converting to float: 60k x 784 float32 is 188 MB we may not need.
        raw[split] = take(ArraySplit(images[:, None], labels), limit, seed, stream)
    if raw["train"].x.shape[2:] != raw["test"].x.shape[2:]:
        raise DataError(f"MNIST train and test images differ in size at {root}")
    check_fits("mnist", len(raw["train"]), len(raw["test"]), 1,
               final_size or raw["train"].x.shape[2])
    splits = {split: ArraySplit(normalise(sub.x.astype(np.float32) / 255.0, MNIST_MEAN,
                                          MNIST_STD), sub.y) for split, sub in raw.items()}
    return ArrayDataset(splits["train"], splits["test"], [str(d) for d in range(10)])


def load_mnist_arrays(root: str | Path, image_size: int, limit_train: int | None = None,
                      limit_test: int | None = None, seed: int = 0) -> ArrayDataset:
    """MNIST as x (N, 1, image_size, image_size) float32 normalised, y (N,) int64."""
    ds = load_mnist_raw(root, limit_train, limit_test, seed, final_size=image_size)
    if ds.image_size == image_size:
        return ds
    # Resizing after normalising is fine: bilinear resize is affine-invariant.
    return ArrayDataset(ArraySplit(resize_images(ds.train.x, image_size), ds.train.y),
                        ArraySplit(resize_images(ds.test.x, image_size), ds.test.y),
                        ds.class_names)
