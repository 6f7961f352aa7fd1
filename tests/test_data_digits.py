"""Digits, synthetic, subsets and the array->torch path for the small datasets."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from labctl.shared.spec import build_spec
from labctl.worker.data import ArrayDataset, TorchDatasets, build_torch_datasets, load_arrays
from labctl.worker.data.subset import subset_indices


def spec(**kw):
    return build_spec({"model": "numpy-cnn", "dataset": "digits", **kw})


def test_digits_shapes_dtypes_and_normalisation():
    ds = load_arrays(spec())
    assert isinstance(ds, ArrayDataset)
    assert ds.train.x.shape == (1437, 1, 8, 8) and ds.test.x.shape == (360, 1, 8, 8)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int64
    assert ds.num_classes == 10 and ds.class_names == [str(i) for i in range(10)]
    assert abs(float(ds.train.x.mean())) < 1e-4 and abs(float(ds.train.x.std()) - 1) < 1e-4
    assert set(np.unique(ds.train.y)) == set(range(10))
    assert ds.channels == 1 and ds.image_size == 8


def test_digits_split_is_stratified_and_independent_of_seed():
    a, b = load_arrays(spec(seed=0)), load_arrays(spec(seed=123))
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    train_frac = np.bincount(a.train.y) / len(a.train.y)
    test_frac = np.bincount(a.test.y) / len(a.test.y)
    assert np.abs(train_frac - test_frac).max() < 0.01
    # No image is in both splits.
    train_rows = {row.tobytes() for row in a.train.x.reshape(len(a.train.x), -1)}
    overlap = sum(row.tobytes() in train_rows for row in a.test.x.reshape(len(a.test.x), -1))
    assert overlap <= 5  # digits has a handful of duplicated images; the split itself is clean


def test_digits_resize():
    ds = load_arrays(spec(image_size=16))
    assert ds.train.x.shape == (1437, 1, 16, 16)
    assert abs(float(ds.train.x.mean())) < 1e-4


def test_limits_take_a_deterministic_seeded_subset():
    a = load_arrays(spec(limit_train=100, limit_test=50, seed=1))
    b = load_arrays(spec(limit_train=100, limit_test=50, seed=1))
    c = load_arrays(spec(limit_train=100, limit_test=50, seed=2))
    assert len(a.train) == 100 and len(a.test) == 50
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.train.x, c.train.x)
    assert a.num_classes == 10  # the class list is not shrunk by a subset
    full = load_arrays(spec(limit_train=10**6))
    assert len(full.train) == 1437


def test_subset_indices():
    idx = subset_indices(1000, 10, seed=5, stream=0)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, subset_indices(1000, 10, seed=5, stream=0))
    assert not np.array_equal(idx, subset_indices(1000, 10, seed=5, stream=1))
    np.testing.assert_array_equal(subset_indices(7, None, 0, 0), np.arange(7))
    np.testing.assert_array_equal(subset_indices(7, 9, 0, 0), np.arange(7))


def test_synthetic_is_deterministic_learnable_and_sized():
    s = spec(dataset="synthetic", num_classes=4, image_size=16, seed=3)
    a, b = load_arrays(s), load_arrays(s)
    assert a.train.x.shape == (2048, 3, 16, 16) and a.test.x.shape == (512, 3, 16, 16)
    assert a.num_classes == 4 and a.train.y.dtype == np.int64
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert np.bincount(a.train.y).min() == 512  # balanced
    other = load_arrays(spec(dataset="synthetic", num_classes=4, image_size=16, seed=4))
    assert not np.array_equal(a.train.x, other.train.x)
    # Learnable: nearest class mean (from train) classifies the test split well.
    means = np.stack([a.train.x[a.train.y == k].mean(0).ravel() for k in range(4)])
    dist = ((a.test.x.reshape(512, 1, -1) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == a.test.y).mean() > 0.9
    small = load_arrays(spec(dataset="synthetic", limit_train=40, limit_test=8))
    assert len(small.train) == 40 and len(small.test) == 8
    assert small.train.x.shape[1:] == (3, 32, 32) and small.num_classes == 10


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_torch_small_datasets_are_3_channel_resized_and_picklable(dataset):
    s = build_spec({"dataset": dataset, "image_size": 24, "limit_train": 20, "limit_test": 10})
    tds = build_torch_datasets(s)
    assert isinstance(tds, TorchDatasets)
    assert len(tds.train) == 20 and len(tds.test) == 10 and tds.num_classes == 10
    x, y = tds.train[3]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(y, int)
    if dataset == "digits":
        # Grey repeated to three identical channels.
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    clone = pickle.loads(pickle.dumps(tds.train))
    assert torch.equal(clone[3][0], x)
    batch = next(iter(torch.utils.data.DataLoader(tds.test, batch_size=4)))
    assert batch[0].shape == (4, 3, 24, 24) and batch[1].dtype == torch.int64


def test_torch_digits_labels_match_arrays():
    s = build_spec({"dataset": "digits", "limit_test": 30, "seed": 7})
    tds, arrays = build_torch_datasets(s), load_arrays(s)
    assert [tds.test[i][1] for i in range(30)] == arrays.test.y.tolist()


@pytest.mark.parametrize("h, size", [(8, 8), (8, 224), (28, 14), (28, 10), (4, 32)])
def test_resize_images_matches_pil_bilinear(h, size):
    from PIL import Image

    from labctl.worker.data.arrays import resize_images

    x = np.random.default_rng(0).random((2, 3, h, h), dtype=np.float32)
    ours = resize_images(x, size)
    pil = np.stack([[np.asarray(Image.fromarray(x[i, c]).resize(
        (size, size), Image.Resampling.BILINEAR)) for c in range(3)] for i in range(2)])
    assert ours.shape == (2, 3, size, size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, pil, atol=1e-5)


@pytest.mark.parametrize("shape,size", [((40, 1, 8, 8), 8), ((40, 1, 8, 8), 5),
                                        ((40, 1, 8, 8), 64), ((6, 3, 7, 9), 13)])
def test_resized_moments_are_those_of_the_resized_images(shape, size):
    from labctl.worker.data.arrays import resize_images, resized_moments

    x = np.random.default_rng(0).random(shape).astype(np.float32)
    resized = resize_images(x, size)
    mean, std = resized_moments(x, size)
    assert mean == pytest.approx(float(resized.mean()), rel=1e-5)
    assert std == pytest.approx(float(resized.std()), rel=1e-5)


def test_limits_apply_before_resizing():
    """--image-size 1024 on digits allocated 7 GiB before keeping 8 images of it."""
    import tracemalloc

    tracemalloc.start()
    try:
        ds = load_arrays(spec(image_size=1024, limit_train=8, limit_test=4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ds.train.x.shape == (8, 1, 1024, 1024) and ds.test.x.shape == (4, 1, 1024, 1024)
    assert peak < 256 * 2**20  # the 12 images are 48 MiB
    # Normalised with the whole train split's statistics, as without the limits.
    small = load_arrays(spec(image_size=16, limit_train=100))
    full = load_arrays(spec(image_size=16))
    index = subset_indices(1437, 100, 0, 0)
    np.testing.assert_allclose(small.train.x, full.train.x[index], atol=1e-5)


def test_a_dataset_bigger_than_the_host_is_refused_with_the_estimate_before_loading():
    from labctl.worker.data.memory import available_memory_bytes
    from labctl.worker.engine import DataError

    if available_memory_bytes() is None:
        pytest.skip("this host does not say how much memory it has")
    huge = build_spec({"model": "numpy-cnn", "dataset": "synthetic", "image_size": 1024,
                       "limit_train": 10_000_000, "limit_test": 100})
    with pytest.raises(DataError) as refused:
        load_arrays(huge)
    assert str(refused.value).startswith(
        "dataset synthetic at 1024 px needs about 117,188.7 GiB of memory (10,000,000 train "
        "+ 100 test images of 3x1024x1024 float32), more than the ")
    assert str(refused.value).endswith(" GiB this host has available; lower --image-size or "
                                       "set --limit-train / --limit-test")
