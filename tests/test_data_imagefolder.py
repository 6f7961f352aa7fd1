"""Generic train/<class>/ + test/<class>/ trees."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from datasets_factory import car_colour, make_mini_imagefolder

from labctl.shared.spec import build_spec
from labctl.worker.data import build_torch_datasets, load_arrays
from labctl.worker.engine import DataError


def spec(root, **kw):
    return build_spec({"dataset": "imagefolder", "data_root": str(root), **kw})


def test_arrays_classes_sorted_and_labels(tmp_path):
    root = make_mini_imagefolder(tmp_path / "pets", classes=("dog", "cat", "emu"), per_class=3,
                                 test_per_class=1)
    ds = load_arrays(spec(root, image_size=12))
    # Folder order on disk does not matter: classes are sorted names.
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.train.x.shape == (9, 3, 12, 12) and ds.test.x.shape == (3, 3, 12, 12)
    assert ds.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # The factory paints class i (in the order given) car_colour(i): "cat" was index 1.
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    rgb = (ds.train.x[0, :, 6, 6] * std + mean) * 255
    assert np.abs(rgb - np.array(car_colour(1))).max() < 10


def test_parent_folder_resolution(tmp_path):
    make_mini_imagefolder(tmp_path / "pets")
    assert load_arrays(spec(tmp_path, image_size=8)).num_classes == 3


def test_mismatched_classes_are_refused(tmp_path):
    root = make_mini_imagefolder(tmp_path, classes=("cat", "dog"), test_classes=("cat", "emu"))
    with pytest.raises(DataError) as err:
        load_arrays(spec(root, image_size=8))
    msg = str(err.value)
    assert "only in train: ['dog']" in msg and "only in test: ['emu']" in msg and str(root) in msg


def test_missing_split_and_empty_class(tmp_path):
    root = make_mini_imagefolder(tmp_path / "a")
    for f in (root / "test").rglob("*.jpg"):
        f.unlink()
    with pytest.raises(DataError, match=r"expected images .* class folder cat/ at .*test"):
        load_arrays(spec(root, image_size=8))
    shutil.rmtree(make_mini_imagefolder(tmp_path / "b") / "test")
    with pytest.raises(DataError, match=r"expected folder test/ .* at .*b"):
        load_arrays(spec(tmp_path / "b", image_size=8))
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"expected folders train/ and test/"):
        load_arrays(spec(tmp_path / "c", image_size=8))


def test_corrupt_image_names_the_file(tmp_path):
    root = make_mini_imagefolder(tmp_path)
    (root / "train" / "dog" / "img001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot decode image img001.jpg at .*train/dog"):
        load_arrays(spec(root, image_size=8))


def test_torch_train_and_test_transforms(tmp_path):
    root = make_mini_imagefolder(tmp_path, size=(50, 30))
    tds = build_torch_datasets(spec(root, image_size=24))
    x, y = tds.train[2]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 1
    t, _ = tds.test[2]
    assert t.shape == (3, 24, 24)
    # ImageNet normalisation of a solid colour: every pixel equals the normalised colour.
    expected = (torch.tensor(car_colour(1)) / 255 - torch.tensor([0.485, 0.456, 0.406])) / \
        torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(t[:, 12, 12], expected, atol=0.1)
