"""MNIST from IDX files: layouts, validation and messages."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from datasets_factory import make_mini_mnist, mnist_images, write_idx

from labctl.shared.spec import build_spec
from labctl.worker.data import build_torch_datasets, load_arrays
from labctl.worker.data.mnist import MNIST_MEAN, MNIST_STD
from labctl.worker.engine import DataError


def spec(root, **kw):
    return build_spec({"model": "numpy-cnn", "dataset": "mnist", "data_root": str(root), **kw})


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_reads_every_layout(tmp_path, gz, layout):
    root = make_mini_mnist(tmp_path, n_train=30, n_test=10, gz=gz, layout=layout)
    ds = load_arrays(spec(root))
    assert ds.train.x.shape == (30, 1, 28, 28) and ds.test.x.shape == (10, 1, 28, 28)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int64
    assert ds.train.y.tolist() == [i % 10 for i in range(30)]
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10
    # Pixels are x/255 normalised with the usual MNIST statistics.
    raw = mnist_images(np.arange(30) % 10, seed=0)
    np.testing.assert_allclose(ds.train.x[:, 0], (raw / 255.0 - MNIST_MEAN) / MNIST_STD,
                               rtol=1e-5, atol=1e-5)


def test_torchvision_reads_the_same_files(tmp_path):
    from torchvision.datasets import MNIST

    make_mini_mnist(tmp_path, n_train=30, n_test=10, layout="torchvision")
    tv = MNIST(str(tmp_path), train=True, download=False)
    ours = load_arrays(spec(tmp_path))
    assert len(tv) == 30 and tv.targets.tolist() == ours.train.y.tolist()


def test_resize_and_limits(tmp_path):
    root = make_mini_mnist(tmp_path, n_train=50, n_test=20)
    ds = load_arrays(spec(root, image_size=14, limit_train=12, limit_test=5, seed=4))
    again = load_arrays(spec(root, image_size=14, limit_train=12, limit_test=5, seed=4))
    assert ds.train.x.shape == (12, 1, 14, 14) and ds.test.x.shape == (5, 1, 14, 14)
    np.testing.assert_array_equal(ds.train.y, again.train.y)
    np.testing.assert_array_equal(ds.train.x, again.train.x)


def test_missing_file_names_file_and_place(tmp_path):
    root = make_mini_mnist(tmp_path)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        load_arrays(spec(root))
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(root) in msg and "MNIST/raw" in msg


def test_bad_magic_is_reported(tmp_path):
    root = make_mini_mnist(tmp_path)
    # An images file holding a labels header (magic 0x801).
    write_idx(root / "train-images-idx3-ubyte", np.zeros(30, np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte .*magic number 0x00000801"):
        load_arrays(spec(root))


def test_truncated_file_is_reported(tmp_path):
    root = make_mini_mnist(tmp_path)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte at .* header"):
        load_arrays(spec(root))


def test_corrupt_gzip_is_reported(tmp_path):
    root = make_mini_mnist(tmp_path, gz=True)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz"):
        load_arrays(spec(root))


def test_label_count_mismatch_is_reported(tmp_path):
    root = make_mini_mnist(tmp_path, n_train=30)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match=r"30 images but train-labels-idx1-ubyte holds 29"):
        load_arrays(spec(root))


def test_out_of_range_label_is_reported(tmp_path):
    root = make_mini_mnist(tmp_path, n_train=30)
    write_idx(root / "train-labels-idx1-ubyte", np.full(30, 10, np.uint8))
    with pytest.raises(DataError, match="label 10"):
        load_arrays(spec(root))


def test_gzip_and_plain_give_identical_data(tmp_path):
    plain = load_arrays(spec(make_mini_mnist(tmp_path / "a")))
    packed = load_arrays(spec(make_mini_mnist(tmp_path / "b", gz=True)))
    np.testing.assert_array_equal(plain.train.x, packed.train.x)
    assert gzip.decompress((tmp_path / "b" / "t10k-labels-idx1-ubyte.gz").read_bytes())[:4] == \
        b"\x00\x00\x08\x01"


def test_torch_mnist_is_three_channel_at_image_size(tmp_path):
    root = make_mini_mnist(tmp_path, n_train=20, n_test=10)
    tds = build_torch_datasets(build_spec({"dataset": "mnist", "data_root": str(root),
                                           "image_size": 32}))
    x, y = tds.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 5
    assert torch.equal(x[0], x[2]) and len(tds.test) == 10 and tds.num_classes == 10


def test_no_data_root_is_a_data_error():
    s = build_spec({"model": "numpy-cnn", "dataset": "mnist", "data_root": None})
    with pytest.raises(DataError, match="needs data_root"):
        load_arrays(s)


def test_damaged_deflate_stream_is_reported(tmp_path):
    # A valid gzip header with a broken compressed body raises zlib.error, not OSError.
    root = make_mini_mnist(tmp_path, gz=True)
    path = root / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[20:60] = bytes(40)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot read train-images-idx3-ubyte.gz"):
        load_arrays(spec(root))


def test_images_and_labels_from_two_copies_are_refused(tmp_path):
    root = make_mini_mnist(tmp_path, layout="torchvision")
    stray = mnist_images(np.arange(30) % 10, seed=1)
    write_idx(root / "train-images-idx3-ubyte", stray)  # a second copy at the top
    with pytest.raises(DataError, match=r"keep one copy of MNIST"):
        load_arrays(spec(root))
