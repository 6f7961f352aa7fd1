"""``labctl predict`` on real jobs trained here (digits), with images this test writes: the
predictions on the test split rendered as PNG files must reproduce the job's recorded test
accuracy and confusion matrix; other formats, colour and odd sizes must classify as their
plain PNG does; and every bad input is one line and its exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from labctl.cli.main import cli
from labctl.shared import folder_lock, lifecycle
from labctl.shared.artifacts import ArtifactStore, write_json
from labctl.shared.records import JobRecords
from labctl.shared.settings import get_settings
from labctl.shared.spec import build_spec
from labctl.shared.testing import free_port
from labctl.worker.data import build_torch_datasets, load_arrays
from labctl.worker.data.arrays import digits_native_split
from labctl.worker.data.predict_inputs import numpy_inputs, pixel_normalisation, torch_inputs
from labctl.worker.data.subset import TEST_STREAM, subset_indices
from labctl.worker.evaluation import confusion_matrix
from labctl.worker.runner import run_job

#: The digits recipe (batch 16, its AdaMax rate) for 3 epochs: about 0.95 here, in seconds.
NUMPY_JOB = {"model": "numpy-cnn", "dataset": "digits", "epochs": 3, "batch_size": 16}
#: Two steps of ResNet50 at 16 px: near chance, but its predictions are what is checked.
RESNET_JOB = {"model": "resnet50", "dataset": "digits", "epochs": 1, "batch_size": 8,
              "image_size": 16, "limit_train": 16, "limit_test": 20, "num_workers": 0,
              "device": "cpu", "lr_schedule": "constant"}
NUMPY_ID, RESNET_ID = "20261201-000000-00000a", "20261201-000000-00000b"


def invoke(*args: str):
    return CliRunner().invoke(cli, ["predict", *args])


@pytest.fixture(autouse=True)
def _no_redis(monkeypatch):
    """A port nothing listens on: a job without a folder here is looked up there and not
    found, whatever runs on this machine's 6379."""
    monkeypatch.setenv("LABCTL_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()


def render_test_split(spec_fields: dict, folder: Path) -> tuple[list[str], np.ndarray]:
    """The job's test images (its limit_test subset) as 8-bit grey PNG files, and labels."""
    spec = build_spec(spec_fields)
    _, test = digits_native_split()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in subset_indices(len(test), spec.limit_test, spec.seed, TEST_STREAM):
        path = folder / f"test-{i:03d}-label-{test.y[i]}.png"
        Image.fromarray(np.round(test.x[i, 0] * 255).astype(np.uint8), "L").save(path)
        paths.append(str(path))
    labels = test.y[subset_indices(len(test), spec.limit_test, spec.seed, TEST_STREAM)]
    return paths, labels


@pytest.fixture(scope="module")
def numpy_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    outcome = run_job(build_spec(NUMPY_JOB), NUMPY_ID, ArtifactStore(root))
    assert outcome.state == "succeeded", outcome.error
    paths, labels = render_test_split(NUMPY_JOB, tmp_path_factory.mktemp("digits-png"))
    return root, outcome.summary, paths, labels


def predicted_labels(result) -> np.ndarray:
    assert result.exit_code == 0, result.output
    return np.array([p["top"][0]["index"] for p in json.loads(result.stdout)["predictions"]])


def assert_agrees_with_the_record(root: Path, job_id: str, summary: dict, labels: np.ndarray,
                                  predicted: np.ndarray, moved: int) -> None:
    """Predictions reproduce the recorded confusion matrix, but for at most ``moved``
    images (the PNGs round the digits' 17 grey levels to 8 bits)."""
    recorded = np.load(root / job_id / "confusion_matrix.npy")
    ours = confusion_matrix(labels, predicted, recorded.shape[0])
    assert np.abs(ours - recorded).sum() <= 2 * moved  # each moved image leaves one cell
    accuracy = float(np.mean(predicted == labels))
    assert abs(accuracy - summary["final"]["test_accuracy"]) <= moved / len(labels)


def test_predictions_on_the_rendered_test_split_reproduce_the_recorded_accuracy(numpy_job):
    root, summary, paths, labels = numpy_job
    assert summary["final"]["test_accuracy"] > 0.85  # a model worth checking against
    result = invoke(NUMPY_ID, *paths, "--artifacts-dir", str(root), "--json", "-k", "3")
    assert_agrees_with_the_record(root, NUMPY_ID, summary, labels, predicted_labels(result),
                                  moved=2)


def test_json_shape_and_top_k_order(numpy_job):
    root, _, paths, _ = numpy_job
    result = invoke(NUMPY_ID, *paths[:4], "--artifacts-dir", str(root), "--json", "--top-k", "3")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["job_id"], out["model"], out["dataset"]) == (NUMPY_ID, "numpy-cnn", "digits")
    assert [p["image"] for p in out["predictions"]] == paths[:4]
    for prediction in out["predictions"]:
        top = prediction["top"]
        assert len(top) == 3 and len({s["index"] for s in top}) == 3
        assert all(s["class"] == str(s["index"]) for s in top)  # digits' names are 0..9
        probabilities = [s["probability"] for s in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 < p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-9
    # Every class: the probabilities are a whole distribution.
    every = invoke(NUMPY_ID, paths[0], "--artifacts-dir", str(root), "--json", "-k", "50")
    (only,) = json.loads(every.stdout)["predictions"]
    assert len(only["top"]) == 10
    assert sum(s["probability"] for s in only["top"]) == pytest.approx(1.0)


def test_text_output_is_the_image_then_its_classes(numpy_job):
    root, _, paths, _ = numpy_job
    result = invoke(NUMPY_ID, paths[0], paths[1], "--artifacts-dir", str(root), "-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [lines[0], lines[3]] == paths[:2] and len(lines) == 6
    for line in lines[1:3] + lines[4:6]:
        percent, name = line.split()
        assert line.startswith("  ") and percent.endswith("%") and name in "0123456789"
    assert float(lines[1].split()[0][:-1]) >= float(lines[2].split()[0][:-1])
    # The message says which job answered, on stderr.
    assert result.stderr.startswith(f"labctl: job {NUMPY_ID}: numpy-cnn on digits, test "
                                    "accuracy ")
    assert result.stderr.count("\n") == 1


def test_colour_other_formats_and_odd_sizes_classify_as_the_plain_png(numpy_job, tmp_path):
    root, _, paths, _ = numpy_job
    chosen = paths[:40]
    variants: dict[str, list[str]] = {"rgb": [], "jpeg": [], "odd": [], "gif": []}
    for path in chosen:
        grey = Image.open(path)
        stem = tmp_path / Path(path).stem
        writes = {"rgb": (grey.convert("RGB"), ".png"),
                  "jpeg": (grey.resize((64, 64), Image.Resampling.NEAREST), ".jpg"),
                  "odd": (grey.resize((40, 24), Image.Resampling.NEAREST).convert("RGB"),
                          ".bmp"),
                  "gif": (grey.convert("P"), ".gif")}
        for kind, (image, suffix) in writes.items():
            image.save(f"{stem}-{kind}{suffix}")
            variants[kind].append(f"{stem}-{kind}{suffix}")

    def probabilities(files):
        result = invoke(NUMPY_ID, *files, "--artifacts-dir", str(root), "--json", "-k", "10")
        assert result.exit_code == 0, result.output
        return [{s["index"]: s["probability"] for s in p["top"]}
                for p in json.loads(result.stdout)["predictions"]]

    plain = probabilities(chosen)
    # Grey in RGB (or a palette) is the same grey after the conversion the dataset had.
    for kind in ("rgb", "gif"):
        for ours, theirs in zip(probabilities(variants[kind]), plain, strict=True):
            assert ours == pytest.approx(theirs, abs=1e-9)
    # JPEG loses detail, and an odd size is resized back: the same class nearly always.
    for kind in ("jpeg", "odd"):
        same = [max(ours, key=ours.get) == max(theirs, key=theirs.get)
                for ours, theirs in zip(probabilities(variants[kind]), plain, strict=True)]
        assert sum(same) >= 0.85 * len(same), kind


@pytest.mark.parametrize(("model", "image_size"), [("numpy-cnn", None), ("numpy-cnn", 16),
                                                  ("resnet50", 24)])
def test_preprocessing_of_the_rendered_files_is_the_test_split_s(tmp_path, model, image_size):
    # What the network sees for each PNG is the test split's own tensor, but for the 8-bit
    # rounding of the files: half a grey level over the std the loader normalised with.
    fields = {**(RESNET_JOB if model == "resnet50" else NUMPY_JOB), "image_size": image_size}
    spec = build_spec(fields)
    paths, _ = render_test_split(fields, tmp_path)
    if model == "numpy-cnn":
        expected, ours = load_arrays(spec).test.x, numpy_inputs(spec, paths)
        _, std = pixel_normalisation("digits", spec.effective_image_size)
    else:
        import torch

        test = build_torch_datasets(spec).test
        expected = torch.stack([test[i][0] for i in range(len(test))]).numpy()
        dataset = torch_inputs(spec, paths)
        ours = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
        _, std = pixel_normalisation("digits", 8)  # normalised at native size, then resized
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 0.5 / 255 / std * (1 + 1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("torch_one_thread")
def test_a_resnet50_job_predicts_its_own_test_accuracy(tmp_path):
    root = tmp_path / "artifacts"
    outcome = run_job(build_spec(RESNET_JOB), RESNET_ID, ArtifactStore(root))
    assert outcome.state == "succeeded", outcome.error
    paths, labels = render_test_split(RESNET_JOB, tmp_path / "png")
    result = invoke(RESNET_ID, *paths, "--artifacts-dir", str(root), "--json",
                    "--device", "cpu")
    assert_agrees_with_the_record(root, RESNET_ID, outcome.summary, labels,
                                  predicted_labels(result), moved=1)
    top = json.loads(result.stdout)["predictions"][0]["top"]
    assert len(top) == 5 and sum(s["probability"] for s in top) <= 1 + 1e-9
    import torch

    if not torch.cuda.is_available():  # a device that is not here is the user's to fix
        assert_one_line(invoke(RESNET_ID, paths[0], "--artifacts-dir", str(root), "--device",
                               "cuda"), 2, "device: cuda requested but no CUDA device")


# -- bad input: one line on stderr, a documented code --------------------------------------

def copy_job(root: Path, job_id: str, new_id: str) -> Path:
    target = root / new_id
    shutil.copytree(root / job_id, target)
    return target


def assert_one_line(result, code: int, start: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"labctl: {start}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_file_that_is_not_an_image(numpy_job, tmp_path):
    root, _, paths, _ = numpy_job
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    result = invoke(NUMPY_ID, paths[0], str(fake), "--artifacts-dir", str(root))
    assert_one_line(result, 2, f"cannot decode image notes.png at {tmp_path}: not an image")


def test_a_truncated_image(numpy_job, tmp_path):
    root, _, _, _ = numpy_job
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(whole)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[:300])
    assert_one_line(invoke(NUMPY_ID, str(cut), "--artifacts-dir", str(root)), 2,
                    "cannot decode image cut.jpg")


@pytest.mark.parametrize(("name", "message"), [("missing.png", "missing.png: no such file"),
                                               ("", "is a folder, not an image file")])
def test_a_missing_image_or_a_folder(numpy_job, tmp_path, name, message):
    root, _, _, _ = numpy_job
    target = str(tmp_path / name) if name else str(tmp_path)
    result = invoke(NUMPY_ID, target, "--artifacts-dir", str(root))
    assert_one_line(result, 2, f"{tmp_path}/{message}" if name else f"{tmp_path} {message}")


def test_an_unknown_job_and_a_bad_id(numpy_job):
    root, _, paths, _ = numpy_job
    result = invoke("20261201-000000-ffffff", paths[0], "--artifacts-dir", str(root))
    assert_one_line(result, 3, f"no job 20261201-000000-ffffff in {root}")
    assert_one_line(invoke("../etc", paths[0], "--artifacts-dir", str(root)), 2,
                    "invalid job id")


@pytest.mark.parametrize(("state", "code", "message"), [
    ("queued", 4, "is queued; it has final weights once it succeeds"),
    ("failed", 1, "failed, so it has no final weights"),
    ("cancelled", 1, "was cancelled, so it has no final weights"),
])
def test_a_job_that_has_not_succeeded(numpy_job, state, code, message):
    root, _, paths, _ = numpy_job
    new_id = f"20261201-000001-{code}0000{len(state)}"
    copy_job(root, NUMPY_ID, new_id)
    ArtifactStore(root).job(new_id).update_status(state=state)
    result = invoke(new_id, paths[0], "--artifacts-dir", str(root))
    assert_one_line(result, code, f"job {new_id} {message}")


def test_a_running_job_and_one_whose_run_died(numpy_job):
    root, _, paths, _ = numpy_job
    folder = copy_job(root, NUMPY_ID, "20261201-000001-000007")
    ArtifactStore(root).job(folder.name).update_status(state="running")
    with folder_lock.hold(folder, folder_lock.LOCAL_RUN):  # a run on this host writes it
        assert_one_line(invoke(folder.name, paths[0], "--artifacts-dir", str(root)), 4,
                        f"job {folder.name} is running; it has final weights once it succeeds")
    # Nobody holds it now, and its last holder was on this host: that run was killed.
    assert_one_line(invoke(folder.name, paths[0], "--artifacts-dir", str(root)), 1,
                    f"job {folder.name} stopped without finishing, so it has no final "
                    f"weights; resume it with labctl run --resume {folder.name}")


@pytest.mark.integration
def test_a_queued_job_whose_folder_does_not_exist_yet(numpy_job, redis_server, monkeypatch):
    # Queued jobs get their folder when a worker starts them: Redis tells it from a typo.
    root, _, paths, _ = numpy_job
    monkeypatch.setenv("LABCTL_REDIS_URL", redis_server.url)
    get_settings.cache_clear()
    job_id = "20261201-000004-00000f"
    lifecycle.queued(JobRecords.from_url(redis_server.url), job_id, build_spec(NUMPY_JOB), "cpu")
    assert_one_line(invoke(job_id, paths[0], "--artifacts-dir", str(root)), 4,
                    f"job {job_id} is queued; it has final weights once it succeeds")
    assert_one_line(invoke("20261201-000004-0000ff", paths[0], "--artifacts-dir", str(root)),
                    3, f"no job 20261201-000004-0000ff in {root}")


def test_a_succeeded_job_without_its_weights_or_with_broken_ones(numpy_job):
    root, _, paths, _ = numpy_job
    gone = copy_job(root, NUMPY_ID, "20261201-000002-00000c")
    (gone / "model.npz").unlink()
    assert_one_line(invoke(gone.name, paths[0], "--artifacts-dir", str(root)), 1,
                    f"job {gone.name} has no final weights: expected model.npz in {gone}")
    broken = copy_job(root, NUMPY_ID, "20261201-000002-00000d")
    (broken / "model.npz").write_bytes(b"PK\x03\x04 half a zip")
    assert_one_line(invoke(broken.name, paths[0], "--artifacts-dir", str(root)), 1,
                    f"job {broken.name}: cannot read the final weights")


def test_devices_numpy_cnn_cannot_use(numpy_job):
    root, _, paths, _ = numpy_job
    assert_one_line(invoke(NUMPY_ID, paths[0], "--artifacts-dir", str(root), "--device",
                           "cuda"), 2, "device: numpy-cnn runs on the CPU only, not cuda")
    assert_one_line(invoke(NUMPY_ID, paths[0], "--artifacts-dir", str(root), "--device",
                           "gpu"), 2, "device: 'gpu' is not auto, cpu, cuda or cuda:N")


def test_a_synthetic_data_job_has_no_images_to_predict(numpy_job):
    root, _, paths, _ = numpy_job
    synthetic = copy_job(root, NUMPY_ID, "20261201-000003-00000e")
    spec = json.loads((synthetic / "spec.json").read_text())
    write_json(synthetic / "spec.json", {**spec, "dataset": "synthetic", "image_size": 8,
                                         "lr": 5e-3})
    assert_one_line(invoke(synthetic.name, paths[0], "--artifacts-dir", str(root)), 2,
                    "a synthetic-data job has no image form")


# -- the file datasets and MNIST: the same files, so exactly the test split --------------

def mnist_test_pngs(data_root: Path, folder: Path) -> list[str]:
    from labctl.worker.data.mnist import read_mnist_split

    images, _ = read_mnist_split(data_root, "test")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i:03d}.png") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image, "L").save(path)
    return paths


@pytest.mark.parametrize(("model", "dataset", "image_size"), [
    ("numpy-cnn", "mnist", None), ("numpy-cnn", "mnist", 16), ("resnet50", "mnist", 32),
    ("numpy-cnn", "stanford-cars", 16), ("resnet50", "imagefolder", 32)])
def test_preprocessing_of_mnist_and_file_datasets_is_the_test_split_s(tmp_path, model, dataset,
                                                                     image_size):
    from datasets_factory import make_mini_imagefolder, make_mini_mnist, make_mini_stanford_cars

    from labctl.worker.data.images import load_image_source

    if dataset == "mnist":
        root = make_mini_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    elif dataset == "stanford-cars":
        root = make_mini_stanford_cars(tmp_path, n_classes=3, per_class=2, test_per_class=2)
    else:
        root = make_mini_imagefolder(tmp_path / "folders", size=(50, 31))
    spec = build_spec({"model": model, "dataset": dataset, "data_root": str(root),
                       "image_size": image_size, "num_workers": 0, "device": "cpu"})
    paths = (mnist_test_pngs(root, tmp_path / "png") if dataset == "mnist"
             else load_image_source(spec).test.paths)
    if model == "numpy-cnn":
        expected, ours = load_arrays(spec).test.x, numpy_inputs(spec, paths)
    else:
        import torch

        test = build_torch_datasets(spec).test
        expected = torch.stack([test[i][0] for i in range(len(test))]).numpy()
        dataset_ = torch_inputs(spec, paths)
        ours = torch.stack([dataset_[i][0] for i in range(len(dataset_))]).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_a_stanford_cars_job_names_its_classes_in_the_devkit_s_order(tmp_path):
    from datasets_factory import CAR_NAMES, make_mini_stanford_cars

    from labctl.worker.data.images import load_image_source

    # Six classes: the sixth, "Acura Integra Type R 2001", sorts before the second.
    base = make_mini_stanford_cars(tmp_path / "data", n_classes=6, per_class=3,
                                   test_per_class=2)
    spec = build_spec({"model": "numpy-cnn", "dataset": "stanford-cars", "data_root": str(base),
                       "image_size": 16, "epochs": 4, "batch_size": 6, "lr": 3e-3})
    root = tmp_path / "artifacts"
    outcome = run_job(spec, "20261201-000005-00000c", ArtifactStore(root))
    assert outcome.state == "succeeded", outcome.error
    test = load_image_source(spec).test
    result = invoke(outcome.job_id, *test.paths, "--artifacts-dir", str(root), "--json")
    predicted = predicted_labels(result)
    # The very files the job tested on: its confusion matrix, image for image.
    recorded = np.load(root / outcome.job_id / "confusion_matrix.npy")
    assert (confusion_matrix(test.labels, predicted, 6) == recorded).all()
    for prediction in json.loads(result.stdout)["predictions"]:
        assert [s["class"] for s in prediction["top"]] == \
            [CAR_NAMES[s["index"]] for s in prediction["top"]]


def test_a_job_from_before_summaries_listed_class_names(numpy_job):
    root, _, paths, _ = numpy_job
    older = copy_job(root, NUMPY_ID, "20261201-000006-00000d")
    summary = json.loads((older / "summary.json").read_text())
    del summary["class_names"]
    write_json(older / "summary.json", summary)
    result = invoke(older.name, paths[0], "--artifacts-dir", str(root), "--json", "-k", "10")
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.stdout)["predictions"]
    assert {s["class"] for s in prediction["top"]} == {str(d) for d in range(10)}
