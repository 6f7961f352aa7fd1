"""The validation split: carved from the training split, stratified, the same for every
seed, and never the test split (what tuning may look at)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets_factory import make_mini_imagefolder

from labctl.shared.artifacts import ArtifactStore
from labctl.shared.spec import SpecError, build_spec
from labctl.worker.data import build_torch_datasets, load_arrays
from labctl.worker.data.images import load_image_source
from labctl.worker.data.validation import validation_indices
from labctl.worker.runner import run_job


def digits(**kw):
    return build_spec({"model": "numpy-cnn", "dataset": "digits", **kw})


def rows(x: np.ndarray) -> list[bytes]:
    return [image.tobytes() for image in x]


def test_indices_are_disjoint_cover_everything_and_keep_class_proportions():
    labels = np.repeat(np.arange(4), [10, 20, 40, 30])
    kept, held = validation_indices(labels, 0.25)
    assert not set(kept) & set(held)
    assert sorted([*kept, *held]) == list(range(len(labels)))
    assert np.bincount(labels[held]).tolist() == [3, 5, 10, 8]  # round(0.25 * n) per class
    # Seeded by a constant: the same labels give the same split every time.
    again_kept, again_held = validation_indices(labels, 0.25)
    assert held.tolist() == again_held.tolist() and kept.tolist() == again_kept.tolist()


def test_a_class_of_one_stays_in_training():
    kept, held = validation_indices(np.array([0, 1, 1, 1, 1]), 0.5)
    assert 0 in kept.tolist() and len(held) == 2


def test_digits_validation_comes_from_the_training_split_and_never_the_test_split():
    plain = load_arrays(digits())
    tuned = load_arrays(digits(validation=0.2))
    kept, held = validation_indices(plain.train.y, 0.2)
    np.testing.assert_array_equal(tuned.test.x, plain.train.x[held])
    np.testing.assert_array_equal(tuned.train.x, plain.train.x[kept])
    assert len(tuned.train) + len(tuned.test) == len(plain.train)
    test_images = set(rows(plain.test.x))
    assert not test_images & set(rows(tuned.test.x))
    assert not test_images & set(rows(tuned.train.x))
    # Stratified: every class keeps its share of the validation split, within one image.
    expected = np.bincount(plain.train.y) * 0.2
    assert np.abs(np.bincount(tuned.test.y) - expected).max() <= 1


def test_the_validation_split_does_not_depend_on_the_seed():
    a, b = load_arrays(digits(validation=0.2, seed=0)), load_arrays(digits(validation=0.2,
                                                                          seed=7))
    np.testing.assert_array_equal(a.test.x, b.test.x)


def test_torch_datasets_evaluate_on_the_same_validation_split():
    arrays = load_arrays(digits(validation=0.2))
    torch_sets = build_torch_datasets(build_spec({"model": "resnet50", "dataset": "digits",
                                                  "validation": 0.2, "image_size": 8}))
    assert len(torch_sets.test) == len(arrays.test)
    assert [torch_sets.test[i][1] for i in range(len(arrays.test))] == arrays.test.y.tolist()


def test_photo_datasets_carve_validation_from_train_files_and_never_read_test(tmp_path):
    root = make_mini_imagefolder(tmp_path / "pets", per_class=5, test_per_class=2)
    spec = build_spec({"dataset": "imagefolder", "data_root": str(root), "validation": 0.4,
                       "image_size": 12})
    source = load_image_source(spec)
    assert all("/train/" in p for p in source.test.paths + source.train.paths)
    assert not set(source.test.paths) & set(source.train.paths)
    assert np.bincount(source.test.labels).tolist() == [2, 2, 2]
    for image in (root / "test").rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")  # decoding a test image now would fail
    assert len(load_arrays(spec).test) == 6


@pytest.mark.parametrize("fraction", [0, 0.6, -0.1])
def test_fractions_outside_the_range_are_refused(fraction):
    with pytest.raises(SpecError) as err:
        digits(validation=fraction)
    assert err.value.field == "validation"


def test_a_job_with_a_validation_split_says_what_it_evaluated(tmp_path):
    store = ArtifactStore(tmp_path)
    outcome = run_job(digits(validation=0.2, epochs=1, limit_train=300), "20260101-000000-aaaaaa",
                      store)
    assert outcome.state == "succeeded", outcome.error
    summary = json.loads((store.job(outcome.job_id).summary_path).read_text())
    assert summary["evaluated_on"] == "validation"
    assert summary["test_size"] == 60 and summary["train_size"] == 240
