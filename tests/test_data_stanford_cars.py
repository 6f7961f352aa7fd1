"""Stanford Cars in its three layouts, checked against torchvision and against the disk."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from datasets_factory import (
    CAR_BACKGROUND,
    CAR_BOX,
    CAR_NAMES,
    car_colour,
    make_mini_stanford_cars,
)

from labctl.shared.spec import build_spec
from labctl.worker.data import build_torch_datasets, load_arrays
from labctl.worker.data.stanford_cars import read_stanford_cars, resolve_stanford_cars
from labctl.worker.engine import DataError


def spec(root, **kw):
    return build_spec({"dataset": "stanford-cars", "data_root": str(root), **kw})


@pytest.fixture(autouse=True)
def _no_shared_cache(monkeypatch):
    # Each test's cache stays inside its own tmp dataset folder.
    monkeypatch.delenv("LABCTL_DATA_CACHE_DIR", raising=False)


def test_official_layout_is_what_torchvision_reads(tmp_path):
    from torchvision.datasets import StanfordCars

    base = make_mini_stanford_cars(tmp_path, "official", n_classes=3, per_class=2,
                                   test_per_class=3)
    ours = read_stanford_cars(tmp_path)
    for split, samples in (("train", ours.train), ("test", ours.test)):
        tv = StanfordCars(str(base.parent), split=split, download=False)
        assert tv.classes == ours.class_names == CAR_NAMES[:3]
        assert [p for p, _ in tv._samples] == samples.paths
        assert [t for _, t in tv._samples] == samples.labels.tolist()
        image, target = tv[0]
        assert image.size == (48, 36) and target == 0
    assert len(ours.train) == 6 and len(ours.test) == 9
    assert ours.train.labels.tolist() == [0, 1, 2, 0, 1, 2]  # 0-based, from 1-based .mat
    assert ours.root == base


@pytest.mark.parametrize("layout", ["official", "kaggle", "folders"])
@pytest.mark.parametrize("point_at", ["dataset", "parent"])
def test_every_layout_from_folder_or_parent(tmp_path, layout, point_at):
    base = make_mini_stanford_cars(tmp_path / "data", layout, n_classes=4, per_class=2,
                                   test_per_class=1)
    root = base if point_at == "dataset" else base.parent
    assert resolve_stanford_cars(root) == (base, layout)
    ds = load_arrays(spec(root, image_size=16))
    assert ds.train.x.shape == (8, 3, 16, 16) and ds.test.x.shape == (4, 3, 16, 16)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int64
    assert sorted(ds.train.y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    expected = CAR_NAMES[:4] if layout != "folders" else sorted(CAR_NAMES[:4])
    assert ds.class_names == expected and ds.num_classes == 4


def test_parent_search_prefers_the_cars_folder(tmp_path):
    (tmp_path / "aaa_other" / "train").mkdir(parents=True)
    base = make_mini_stanford_cars(tmp_path, "official")
    assert resolve_stanford_cars(tmp_path) == (base, "official")


def test_nothing_found_says_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        load_arrays(spec(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "devkit/cars_meta.mat" in msg and "train/<class>/" in msg


@pytest.mark.parametrize("missing, where", [
    ("devkit/cars_meta.mat", "devkit"),
    ("devkit/cars_train_annos.mat", "devkit"),
    ("cars_test_annos_withlabels.mat", ""),
])
def test_missing_mat_file_names_file_and_place(tmp_path, missing, where):
    base = make_mini_stanford_cars(tmp_path, "official")
    (base / missing).unlink()
    with pytest.raises(DataError) as err:
        load_arrays(spec(tmp_path))
    msg = str(err.value)
    name = missing.split("/")[-1]
    assert f"expected {name} at {base / where if where else base}" in msg
    if name == "cars_test_annos_withlabels.mat":
        assert "no class labels" in msg  # devkit/cars_test_annos.mat is present but useless


def test_missing_image_folder_and_images(tmp_path):
    base = make_mini_stanford_cars(tmp_path, "official")
    shutil.rmtree(base / "cars_test")
    with pytest.raises(DataError, match=r"expected folder cars_test/ .* at " + str(base)):
        load_arrays(spec(tmp_path))
    base = make_mini_stanford_cars(tmp_path / "b", "kaggle")
    (base / "cars_train" / "cars_train" / "00002.jpg").unlink()
    (base / "cars_train" / "cars_train" / "00005.jpg").unlink()
    with pytest.raises(DataError) as err:
        load_arrays(spec(base))
    msg = str(err.value)
    assert "cars_train_annos.mat" in msg and str(base / "cars_train" / "cars_train") in msg
    assert "2 missing" in msg and "00002.jpg" in msg and "00005.jpg" in msg


def test_class_outside_meta_is_reported(tmp_path):
    base = make_mini_stanford_cars(tmp_path, "official", n_classes=3)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array([CAR_NAMES[:2]], dtype=object)})
    with pytest.raises(DataError, match=r"class 3 .* outside 1\.\.2"):
        load_arrays(spec(tmp_path))


def test_corrupt_mat_is_reported(tmp_path):
    base = make_mini_stanford_cars(tmp_path, "official")
    (base / "devkit" / "cars_train_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read cars_train_annos.mat at .*devkit"):
        load_arrays(spec(tmp_path))


def test_single_image_split(tmp_path):
    # squeeze_me turns a 1-element struct array into a scalar; it must still read.
    make_mini_stanford_cars(tmp_path, "official", n_classes=1, per_class=1)
    src = read_stanford_cars(tmp_path)
    assert len(src.train) == 1 and src.class_names == CAR_NAMES[:1]


def test_crop_to_bbox(tmp_path):
    make_mini_stanford_cars(tmp_path, "official", n_classes=3, per_class=1)
    src = read_stanford_cars(tmp_path, crop_to_bbox=True)
    assert src.train.boxes.tolist() == [list(CAR_BOX)] * 3
    cropped = load_arrays(spec(tmp_path, image_size=8, crop_to_bbox=True))
    whole = load_arrays(spec(tmp_path, image_size=8))
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    for i, label in enumerate(cropped.train.y):
        rgb = (cropped.train.x[i] * std + mean) * 255
        # Cropped: the whole image is the car colour (JPEG error aside)...
        assert np.abs(rgb - np.array(car_colour(label))[:, None, None]).max() < 30
        # ...uncropped: the corners are still background.
        corner = (whole.train.x[i, :, 0, 0] * std[:, 0, 0] + mean[:, 0, 0]) * 255
        assert np.abs(corner - np.array(CAR_BACKGROUND)).max() < 30
    tds = build_torch_datasets(spec(tmp_path, image_size=16, crop_to_bbox=True))
    x, _ = tds.test[0]
    rgb = (x.numpy() * std + mean) * 255
    assert np.abs(rgb - np.array(car_colour(0))[:, None, None]).max() < 30


def test_crop_to_bbox_needs_annotations(tmp_path):
    make_mini_stanford_cars(tmp_path, "folders")
    with pytest.raises(DataError, match="crop_to_bbox needs the annotation files"):
        load_arrays(spec(tmp_path, crop_to_bbox=True))


def test_limits_are_deterministic_and_keep_classes(tmp_path):
    make_mini_stanford_cars(tmp_path, "official", n_classes=5, per_class=4)
    a = read_stanford_cars(tmp_path)
    s1 = load_arrays(spec(tmp_path, image_size=8, limit_train=7, limit_test=3, seed=9))
    s2 = load_arrays(spec(tmp_path, image_size=8, limit_train=7, limit_test=3, seed=9))
    assert len(s1.train) == 7 and len(s1.test) == 3 and s1.num_classes == 5
    np.testing.assert_array_equal(s1.train.x, s2.train.x)
    tds = build_torch_datasets(spec(tmp_path, image_size=8, limit_train=7, seed=9))
    assert tds.train.samples.labels.tolist() == s1.train.y.tolist()
    assert set(tds.train.samples.paths) <= set(a.train.paths)


def test_torch_datasets_transforms_and_pickling(tmp_path):
    make_mini_stanford_cars(tmp_path, "kaggle", n_classes=3, per_class=2)
    tds = build_torch_datasets(spec(tmp_path, image_size=32))
    assert tds.class_names == CAR_NAMES[:3] and tds.num_classes == 3
    assert len(tds.train) == 6 and len(tds.test) == 6
    x, y = tds.train[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    t1, _ = tds.test[0]
    t2, _ = pickle.loads(pickle.dumps(tds.test))[0]
    assert torch.equal(t1, t2)  # the test transform is deterministic
    loader = torch.utils.data.DataLoader(tds.train, batch_size=3, num_workers=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 3, 32, 32) and yb.tolist() == [0, 1, 2]


def test_decode_cache_is_reused_and_matches(tmp_path, monkeypatch):
    base = make_mini_stanford_cars(tmp_path, "official")
    first = load_arrays(spec(tmp_path, image_size=16))
    cache = base / ".labctl-cache"
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4  # data + index for each split
    second = load_arrays(spec(tmp_path, image_size=16))
    np.testing.assert_array_equal(first.train.x, second.train.x)
    assert sorted(p.name for p in cache.iterdir()) == files
    monkeypatch.setenv("LABCTL_DATA_CACHE_DIR", "off")
    third = load_arrays(spec(tmp_path, image_size=16))
    np.testing.assert_array_equal(first.test.x, third.test.x)
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("LABCTL_DATA_CACHE_DIR", str(other))
    load_arrays(spec(tmp_path, image_size=16))
    assert len(list(other.iterdir())) == 4


def test_an_inverted_box_is_reported_when_cropping(tmp_path):
    base = make_mini_stanford_cars(tmp_path, "official")
    path = base / "devkit" / "cars_train_annos.mat"
    annos = scipy.io.loadmat(path)["annotations"]
    first = annos[0, 0]
    first["bbox_x1"], first["bbox_x2"] = first["bbox_x2"].copy(), first["bbox_x1"].copy()
    scipy.io.savemat(path, {"annotations": annos})
    with pytest.raises(DataError, match=r"cars_train_annos\.mat at .*: the box of 00001\.jpg "
                                        r"is inverted \(x \d+\.\.\d+"):
        load_arrays(spec(tmp_path, crop_to_bbox=True))
    load_arrays(spec(tmp_path))  # boxes are only read to crop
