"""The job spec: defaults, bounds, cross-field rules and host checks."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from labctl.shared.spec import (
    DEFAULT_LR,
    JobSpec,
    SpecError,
    build_spec,
    check_runtime,
    load_spec_file,
    resolve_data_root,
    spec_schema,
)


def test_defaults_are_the_flagship_experiment():
    spec = build_spec({"optimizer": "adamax"})
    assert (spec.model, spec.dataset, spec.optimizer) == ("resnet50", "stanford-cars", "adamax")
    assert spec.data_root is None  # resolved where the job runs
    resolved = resolve_data_root(spec, "/data/stanford_cars")
    assert resolved.data_root == "/data/stanford_cars"
    assert resolve_data_root(resolved, "/elsewhere").data_root == "/data/stanford_cars"
    digits = build_spec({"dataset": "digits"})
    assert resolve_data_root(digits, "/data").data_root is None  # bundled data needs none
    assert spec.effective_image_size == 224
    assert spec.epochs >= 1 and spec.batch_size >= 1


@pytest.mark.parametrize("optimizer", ["adam", "adamax"])
def test_learning_rate_default_follows_the_optimizer(optimizer):
    assert build_spec({"optimizer": optimizer}).effective_lr == DEFAULT_LR[optimizer]
    assert build_spec({"optimizer": optimizer, "lr": 0.05}).effective_lr == 0.05


def test_kingma_ba_learning_rates():
    assert DEFAULT_LR == {"adam": 1e-3, "adamax": 2e-3}


def test_image_size_defaults_to_the_native_size_of_small_datasets():
    assert build_spec({"dataset": "digits"}).effective_image_size == 8
    assert build_spec({"dataset": "mnist", "data_root": "/x"}).effective_image_size == 28
    assert build_spec({"dataset": "digits", "image_size": 32}).effective_image_size == 32


@pytest.mark.parametrize(("values", "field"), [
    ({"epochs": 0}, "epochs"),
    ({"epochs": -3}, "epochs"),
    ({"batch_size": 10**6}, "batch_size"),
    ({"lr": 0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"eps": float("inf")}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"model": "vgg"}, "model"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"dataset": "cifar"}, "dataset"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"colour": "red"}, "colour"),
    ({"name": "../etc"}, "name"),
    ({"tags": ["ok", "not ok"]}, "tags"),
    ({"epochs": True}, "epochs"),  # lax pydantic would read one epoch
    ({"lr": True}, "lr"),
    ({"limit_train": False}, "limit_train"),
    ({"betas": [0.9, True]}, "betas"),
])
def test_bad_values_name_their_field(values, field):
    with pytest.raises(SpecError) as err:
        build_spec(values)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert "\n" not in str(err.value)


def test_unknown_field_is_reported_as_such():
    with pytest.raises(SpecError, match="colour: unknown field"):
        build_spec({"colour": "red"})


def test_numpy_cnn_never_runs_on_cuda():
    with pytest.raises(SpecError) as err:
        build_spec({"model": "numpy-cnn", "device": "cuda"})
    assert err.value.field == "device"
    assert build_spec({"model": "numpy-cnn", "device": "cpu"}).device == "cpu"


def test_warmup_must_be_shorter_than_training():
    with pytest.raises(SpecError, match="warmup_epochs"):
        build_spec({"epochs": 2, "warmup_epochs": 2})


def test_spec_is_frozen_and_round_trips_through_json():
    spec = build_spec({"dataset": "digits", "model": "numpy-cnn", "tags": ["a"]})
    with pytest.raises(ValidationError):
        spec.epochs = 3  # type: ignore[misc]
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec


def test_file_datasets_need_an_existing_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("LABCTL_DATA_DIR", raising=False)
    with pytest.raises(SpecError, match="data_root: required"):
        check_runtime(build_spec({"dataset": "mnist"}))
    with pytest.raises(SpecError, match="does not exist"):
        check_runtime(build_spec({"dataset": "mnist", "data_root": str(tmp_path / "nope")}))
    check_runtime(build_spec({"dataset": "mnist", "data_root": str(tmp_path)}))
    check_runtime(build_spec({"dataset": "digits"}))  # bundled: no data_root needed


def test_worker_confines_data_root_to_its_data_dir(tmp_path):
    allowed = tmp_path / "data"
    (allowed / "mnist").mkdir(parents=True)
    outside = tmp_path / "secrets"
    outside.mkdir()
    check_runtime(build_spec({"dataset": "mnist", "data_root": str(allowed / "mnist")}),
                  allowed_data_dir=str(allowed))
    for sneaky in (str(outside), str(allowed / ".." / "secrets")):
        with pytest.raises(SpecError, match="outside the worker's data directory"):
            check_runtime(build_spec({"dataset": "mnist", "data_root": sneaky}),
                          allowed_data_dir=str(allowed))


def test_cuda_is_refused_when_absent():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SpecError, match="no CUDA device"):
        check_runtime(build_spec({"dataset": "digits", "device": "cuda"}))


def test_spec_files_yaml_json_and_broken(tmp_path):
    (tmp_path / "a.yaml").write_text("model: numpy-cnn\nepochs: 3\n")
    assert load_spec_file(tmp_path / "a.yaml") == {"model": "numpy-cnn", "epochs": 3}
    (tmp_path / "a.json").write_text('{"epochs": 4}')
    assert load_spec_file(tmp_path / "a.json") == {"epochs": 4}
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec_file(tmp_path / "list.yaml")
    with pytest.raises(SpecError, match="not found"):
        load_spec_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("name", "text"), [
    ("twice.yaml", "model: numpy-cnn\nepochs: 3\nmodel: resnet50\n"),
    ("twice.json", '{"model": "numpy-cnn", "model": "resnet50"}'),
])
def test_a_field_set_twice_in_a_file_is_refused(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(SpecError, match="^model: set twice in spec file"):
        load_spec_file(tmp_path / name)


def test_yaml_merge_keys_still_work(tmp_path):
    (tmp_path / "merge.yaml").write_text("base: &b {model: numpy-cnn}\nspec:\n  <<: *b\n"
                                         "  epochs: 2\n")
    assert load_spec_file(tmp_path / "merge.yaml")["spec"] == {"model": "numpy-cnn", "epochs": 2}


def test_schema_documents_every_default():
    schema = spec_schema()
    props = schema["properties"]
    assert props["model"]["default"] == "resnet50"
    assert props["dataset"]["default"] == "stanford-cars"
    assert props["epochs"]["default"] == 30
    assert all("default" in prop for name, prop in props.items()), [
        name for name, prop in props.items() if "default" not in prop]
    assert all(prop.get("description") for prop in props.values())
    assert schema["additionalProperties"] is False
    assert math.isclose(props["eps"]["default"], 1e-8)


def test_numpy_cnn_refuses_init_weights():
    # The NumPy CNN has no torchvision checkpoint format; the weights would be ignored.
    with pytest.raises(SpecError, match="^init_weights: applies to resnet50 only$"):
        build_spec({"model": "numpy-cnn", "dataset": "digits", "init_weights": "/x"})
    assert build_spec({"init_weights": "/x"}).init_weights == "/x"


@pytest.mark.parametrize("name", ["deep.yaml", "deep.json"])
def test_deeply_nested_spec_file_is_refused(tmp_path, name):
    text = ('{"a": ' if name.endswith(".json") else "a: ") + "[" * 5000 + "]" * 5000
    (tmp_path / name).write_text(text + ("}" if name.endswith(".json") else ""))
    with pytest.raises(SpecError, match="is not valid (YAML|JSON) .*nested too deeply"):
        load_spec_file(tmp_path / name)


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", "? {a: 1}\n: 2\n"])
def test_yaml_complex_key_is_refused(tmp_path, text):
    (tmp_path / "complex.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"not valid YAML \(line 1: a key must be"):
        load_spec_file(tmp_path / "complex.yaml")


@pytest.mark.parametrize("text", ["a: 2020-13-45\n", "a: !!float abc\n", "a: !!int abc\n"])
def test_yaml_value_that_cannot_be_built_is_refused(tmp_path, text):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"not valid YAML \(line 1: "):
        load_spec_file(tmp_path / "bad.yaml")


def test_oversized_spec_file_is_refused_without_reading_it_all(tmp_path):
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\nepochs: 3\n")
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        load_spec_file(tmp_path / "big.yaml")
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        load_spec_file("/dev/zero")  # endless: only a bounded read can finish


def test_spec_file_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8 text"):
        load_spec_file(tmp_path / "latin1.yaml")


def test_empty_name_and_directory_are_named_plainly(tmp_path):
    with pytest.raises(SpecError, match="^spec file name is empty$"):
        load_spec_file("")
    with pytest.raises(SpecError, match=f"^spec file {tmp_path} is a directory$"):
        load_spec_file(tmp_path)
