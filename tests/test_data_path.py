"""The decode-once data path of ResNet50 jobs on photos: real short jobs counting every JPEG
they open, the budget that makes ``auto`` stream, and where the cache goes."""

from __future__ import annotations

import collections
import logging

import PIL.Image
import pytest
import torch
from datasets_factory import make_mini_stanford_cars

from labctl.shared.artifacts import ArtifactStore
from labctl.shared.spec import SpecError, build_spec
from labctl.worker.runner import run_job
from labctl.worker.torch_engine import TorchEngine

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def opens(monkeypatch):
    """Every PIL.Image.open by path: a counting wrapper around the real function."""
    counts: collections.Counter[str] = collections.Counter()
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        counts[str(fp)] += 1
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return counts


@pytest.fixture
def cars(tmp_path):
    """12 training and 6 test JPEGs in the official layout."""
    base = make_mini_stanford_cars(tmp_path / "data", "official", n_classes=3, per_class=4,
                                   test_per_class=2)
    return base


def cars_spec(root, **overrides):
    return build_spec({"model": "resnet50", "dataset": "stanford-cars", "data_root": str(root),
                       "image_size": 32, "batch_size": 4, "epochs": 2, "warmup_epochs": 0,
                       "device": "cpu", "num_workers": 0, **overrides})


def jpegs(base):
    return sorted(str(p) for p in base.rglob("*.jpg"))


def test_a_job_opens_each_jpeg_once_and_a_second_job_none(cars, opens, tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    spec = cars_spec(cars)
    opens.clear()
    first = run_job(spec, "20260101-000000-000011", store)
    assert first.state == "succeeded", first.error
    assert sorted(opens) == jpegs(cars)  # train and test, every one
    assert max(opens.values()) == 1  # two epochs and an evaluation, one decode each
    assert len(store.job("20260101-000000-000011").read_metrics()) == 2

    opens.clear()
    second = run_job(cars_spec(cars, optimizer="adam", seed=1), "20260101-000000-000012",
                     store)
    assert second.state == "succeeded", second.error
    assert sum(opens.values()) == 0


def test_streaming_decodes_every_epoch(cars, opens):
    # The counter sees what the cache saves: the streaming path opens each training image
    # once per epoch.
    engine = TorchEngine(cars_spec(cars, data_path="stream"))
    assert engine.data_path == "stream"
    opens.clear()
    for epoch in (1, 2):
        engine.train_one_epoch(epoch, lambda batch, batches: None)
    train = [p for p in jpegs(cars) if "cars_train" in p]
    assert sorted(opens) == train and set(opens.values()) == {2}


def test_auto_streams_over_the_budget_with_one_line(cars, labctl_env, caplog):
    labctl_env(data_cache_max_gb=1e-6)  # 1 kB: under the 18 decoded images
    with caplog.at_level(logging.WARNING, logger="labctl.worker.data.data_path"):
        engine = TorchEngine(cars_spec(cars))
    assert engine.data_path == "stream"
    notices = [r.getMessage() for r in caplog.records if r.name.endswith("data_path")]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "18 decoded images" in notices[0] and "LABCTL_DATA_CACHE_MAX_GB" in notices[0]
    assert "(1.0 kB); streaming JPEGs instead" in notices[0]
    assert not (cars / ".labctl-cache").exists() or not any((cars / ".labctl-cache").iterdir())

    forced = TorchEngine(cars_spec(cars, data_path="cache"))  # cache: the budget is not asked
    assert forced.data_path == "cache"


def test_an_unwritable_dataset_folder_caches_under_the_artefacts_root(cars, labctl_env,
                                                                     tmp_path):
    env = labctl_env()
    # A file where the cache folder would go: mkdir fails as on a read-only mount.
    (cars / ".labctl-cache").write_text("not a folder")
    engine = TorchEngine(cars_spec(cars))
    assert engine.data_path == "cache"
    cached = sorted(p.name for p in (tmp_path / "artifacts" / ".decode-cache").iterdir())
    assert len(cached) == 4 and all(name.startswith("decoded-36-") for name in cached)
    assert env["LABCTL_ARTIFACTS_DIR"] == str(tmp_path / "artifacts")
    # Not a job: the listing of job folders ignores it.
    assert ArtifactStore(tmp_path / "artifacts").job_ids() == []


def test_the_cache_key_follows_the_image_size(cars):
    TorchEngine(cars_spec(cars, image_size=32))
    TorchEngine(cars_spec(cars, image_size=48))
    names = {p.name.split("-")[1] for p in (cars / ".labctl-cache").iterdir()}
    assert names == {"36", "54"}  # shorter sides 32 * 256/224 and 48 * 256/224


@pytest.mark.parametrize(("overrides", "field"), [
    ({"model": "numpy-cnn", "dataset": "stanford-cars"}, "data_path"),
    ({"model": "resnet50", "dataset": "digits"}, "data_path"),
])
def test_data_path_applies_to_resnet50_on_photos(overrides, field):
    with pytest.raises(SpecError) as caught:
        build_spec({**overrides, "data_path": "stream"})
    assert caught.value.field == field or str(caught.value).startswith(field)


def loader_tensors(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return (torch.cat([images.float() for images, _ in batches]),
            torch.cat([labels for _, labels in batches]))


def test_cache_and_stream_give_the_network_the_same_learnable_images(tmp_path):
    # What a data path must get right for a network to learn: each image with its own label,
    # cropped to its car box and normalised like the other path. A nearest-class-mean
    # classifier on the loaders' own tensors checks exactly that; a ResNet50 trained on a
    # dozen images at batch 4 lands anywhere from chance to perfect from one machine (or one
    # test order) to the next. One colour per class: a path that mixes up labels, crops or
    # channels scores near chance.
    base = make_mini_stanford_cars(tmp_path / "data", "official", n_classes=3, per_class=4,
                                   test_per_class=4)
    statistics = {}
    for data_path in ("cache", "stream"):
        engine = TorchEngine(cars_spec(base, data_path=data_path, image_size=16,
                                       crop_to_bbox=True))
        assert engine.data_path == data_path
        train, train_labels = loader_tensors(engine.train_loader)
        test, test_labels = loader_tensors(engine.test_loader)
        assert sorted(train_labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
        class_means = torch.stack([train[train_labels == c].mean(0) for c in range(3)])
        distances = ((test[:, None] - class_means[None]) ** 2).flatten(2).sum(2)
        assert distances.argmin(1).tolist() == test_labels.tolist(), data_path
        statistics[data_path] = torch.stack([test.mean(), test.std()])
    assert torch.allclose(statistics["cache"], statistics["stream"], atol=0.05), statistics


def test_a_full_disk_streams_unless_the_cache_is_already_there(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import torch

    from labctl.worker.data import data_path

    # The disk's free space is the host's to report; here it reports 1 MB.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    spec = cars_spec(tmp_path)
    cpu = torch.device("cpu")
    need = data_path.estimated_cache_bytes(100, 256)
    assert need == 100 * 3 * 256 * 384
    full = data_path.choose_data_path(spec, 100, 256, cpu, tmp_path, max_gb=32)
    assert full.mode == "stream" and "the free disk space in" in full.notice
    ready = data_path.choose_data_path(spec, 100, 256, cpu, tmp_path, max_gb=32,
                                       already_cached=True)
    assert ready == data_path.DataPathChoice("cache")
    assert data_path.choose_data_path(cars_spec(tmp_path, data_path="stream"), 1, 256, cpu,
                                      tmp_path, max_gb=32).mode == "stream"
