"""In-memory array datasets: scikit-learn digits, synthetic prototypes, and shared helpers.

Everything here is NumPy so the NumPy engine never imports torch.
"""

from __future__ import annotations

import numpy as np

from labctl.worker.data.memory import check_fits
from labctl.worker.data.subset import TEST_STREAM, TRAIN_STREAM, subset_indices
from labctl.worker.data.types import ArrayDataset, ArraySplit

#: The digits split never depends on spec.seed: every job sees the same train/test images,
#: so runs with different seeds stay comparable.
DIGITS_SPLIT_STATE = 0
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2048, 512
#: Synthetic images have 3 channels for both engines (so one spec means one dataset).
SYNTHETIC_CHANNELS = 3


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PIL's bilinear resize along one axis.

    PIL's filter is a triangle stretched by the scale factor when shrinking (so shrinking
    averages, i.e. antialiases), with weights renormalised at the borders.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    taps = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(taps[None, :] - centres[:, None]) / support, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking, as PIL) of (N, C, H, W) float32 to
    (N, C, size, size). A no-op when the images already have that size.

    Separable matrix products instead of a per-image PIL loop: full MNIST in well under
    a second rather than ~10 s.
    """
    h, w = x.shape[2:]
    if h == size and w == size:
        return x
    rows, cols = resize_matrix(h, size), resize_matrix(w, size)
    # (size, H) @ (N, C, H, W) @ (W, size): one BLAS call per side.
    out = np.matmul(np.matmul(rows, x.astype(np.float32, copy=False)), cols.T)
    return np.ascontiguousarray(out, dtype=np.float32)


def resized_moments(x: np.ndarray, size: int) -> tuple[float, float]:
    """(mean, std) of ``resize_images(x, size)`` without making it: x (N, C, H, W).

    The resize is linear, out = R x C^T with R (size, H) and C (size, W), so
    sum(out) = r^T x c with r, c the column sums of R and C, and
    sum(out**2) = <x, (R^T R) x (C^T C)>: both from the small native images. Digits at
    1024 px would otherwise need 5.6 GiB just to learn two numbers."""
    h, w = x.shape[2:]
    rows = resize_matrix(h, size).astype(np.float64)
    cols = resize_matrix(w, size).astype(np.float64)
    x64 = x.astype(np.float64)
    count = x.shape[0] * x.shape[1] * size * size
    total = np.einsum("h,nchw,w->", rows.sum(axis=0), x64, cols.sum(axis=0))
    squares = np.einsum("nchw,hk,nckv,vw->", x64, rows.T @ rows, x64, cols.T @ cols)
    mean = total / count
    return float(mean), float(np.sqrt(max(squares / count - mean * mean, 0.0)))


def normalise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(x - mean) / std as float32 (in place when x is already float32)."""
    x = x.astype(np.float32, copy=False)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x


def take(split: ArraySplit, limit: int | None, seed: int, stream: int) -> ArraySplit:
    """The seeded ``limit`` subset of a split (see :func:`subset_indices`)."""
    idx = subset_indices(len(split), limit, seed, stream)
    if len(idx) == len(split):
        return split
    return ArraySplit(split.x[idx], split.y[idx])


def digits_native_split() -> tuple[ArraySplit, ArraySplit]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) split 80/20, stratified,
    with a fixed random_state (1,437 train / 360 test), pixels (0..16) scaled to [0, 1]:
    x (N, 1, 8, 8) float32, not yet normalised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_STATE)
    # Keep index order so the split is also stable in its ordering.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (ArraySplit(images[train_idx], labels[train_idx]),
            ArraySplit(images[test_idx], labels[test_idx]))


def digits_normalisation(image_size: int, train: ArraySplit | None = None
                         ) -> tuple[float, float]:
    """(mean, std) digits jobs normalise [0, 1] pixels with at ``image_size``: the full
    train split's after resizing, computed from the native 8x8 images without resizing them
    (``limit_train`` subsets are normalised like the full run, so every job at one size
    shares them). ``train``: the native split, if already loaded."""
    train = train if train is not None else digits_native_split()[0]
    return resized_moments(train.x, image_size)


def load_digits_arrays(image_size: int, limit_train: int | None = None,
                       limit_test: int | None = None, seed: int = 0) -> ArrayDataset:
    """The digits of :func:`digits_native_split`, resized to ``image_size`` and normalised
    with :func:`digits_normalisation`. Returns x of shape (N, 1, image_size, image_size)."""
    native_train, native_test = digits_native_split()
    mean, std = digits_normalisation(image_size, native_train)
    # Only the subsets are resized: the limits come first.
    train = take(native_train, limit_train, seed, TRAIN_STREAM)
    test = take(native_test, limit_test, seed, TEST_STREAM)
    check_fits("digits", len(train), len(test), 1, image_size)
    return ArrayDataset(
        train=ArraySplit(normalise(resize_images(train.x, image_size), mean, std), train.y),
        test=ArraySplit(normalise(resize_images(test.x, image_size), mean, std), test.y),
        class_names=[str(d) for d in range(10)],
    )


def _prototypes(num_classes: int, image_size: int, seed: int) -> np.ndarray:
    """(K, 3, S, S) smooth random patterns, one per class: coarse 4x4 noise upsampled, so
    the class signal survives resizing and is easy for a small CNN to pick up."""
    rng = np.random.default_rng([seed, 2])
    coarse = rng.standard_normal((num_classes, SYNTHETIC_CHANNELS, 4, 4)).astype(np.float32)
    return resize_images(coarse, image_size)


def _synthetic_split(protos: np.ndarray, n: int, seed: int, stream: int) -> ArraySplit:
    rng = np.random.default_rng([seed, 3 + stream])
    k = len(protos)
    # Balanced classes, shuffled: every class appears n // k or n // k + 1 times.
    y = rng.permutation(np.arange(n) % k).astype(np.int64)
    noise = rng.standard_normal((n,) + protos.shape[1:]).astype(np.float32)
    # Random per-image contrast keeps it from being trivially linear in one pixel.
    gain = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1)).astype(np.float32)
    x = protos[y] * gain + noise
    return ArraySplit(x, y)


def load_synthetic_arrays(image_size: int, num_classes: int, limit_train: int | None = None,
                          limit_test: int | None = None, seed: int = 0) -> ArrayDataset:
    """Learnable random images: class prototype x random gain + unit Gaussian noise.

    Deterministic from ``seed``. Sizes: train ``limit_train or 2048``, test ``limit_test or
    512`` (the limits set the size rather than subsetting). Returns x of shape
    (N, 3, image_size, image_size), normalised to zero mean / unit std with train stats.
    """
    sizes = limit_train or SYNTHETIC_TRAIN, limit_test or SYNTHETIC_TEST
    check_fits("synthetic", *sizes, SYNTHETIC_CHANNELS, image_size)
    protos = _prototypes(num_classes, image_size, seed)
    train = _synthetic_split(protos, sizes[0], seed, TRAIN_STREAM)
    test = _synthetic_split(protos, sizes[1], seed, TEST_STREAM)
    mean, std = float(train.x.mean()), float(train.x.std())
    return ArrayDataset(
        train=ArraySplit(normalise(train.x, mean, std), train.y),
        test=ArraySplit(normalise(test.x, mean, std), test.y),
        class_names=[f"class_{i}" for i in range(num_classes)],
    )
