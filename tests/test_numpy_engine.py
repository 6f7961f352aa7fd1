"""NumpyEngine: the Engine protocol for numpy-cnn jobs, resume determinism, divergence,
cancellation and checkpoint files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from labctl.shared.spec import build_spec
from labctl.worker.data.types import ArrayDataset, ArraySplit
from labctl.worker.engine import DataError, JobCancelled, TrainingDiverged
from labctl.worker.numpy_cnn import Sequential, build_default_cnn
from labctl.worker.numpy_engine import NumpyEngine
from labctl.worker.schedule import lr_factor


def toy_dataset(classes: int = 3, train: int = 90, test: int = 30, size: int = 8,
                channels: int = 1, seed: int = 0, scale: float = 1.0) -> ArrayDataset:
    """Noisy copies of one random prototype per class: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((classes, channels, size, size))

    def split(n: int) -> ArraySplit:
        y = rng.integers(0, classes, n)
        x = prototypes[y] + 0.5 * rng.standard_normal((n, channels, size, size))
        return ArraySplit((x * scale).astype(np.float32), y.astype(np.int64))

    return ArrayDataset(split(train), split(test), [f"class{i}" for i in range(classes)])


def make_spec(**overrides):
    values = {"model": "numpy-cnn", "dataset": "synthetic", "epochs": 3, "batch_size": 16,
              "optimizer": "adamax", "seed": 7, "lr_schedule": "cosine", "warmup_epochs": 1}
    values.update(overrides)
    return build_spec(values)


def no_op(batch: int, batches: int) -> None:
    pass


def train_epochs(engine: NumpyEngine, first: int, last: int) -> list[float]:
    return [engine.train_one_epoch(epoch, no_op).loss for epoch in range(first, last + 1)]


def test_engine_describes_its_data_and_files():
    engine = NumpyEngine(make_spec(), dataset=toy_dataset())
    assert (engine.num_classes, engine.train_size, engine.test_size) == (3, 90, 30)
    assert engine.class_names == ["class0", "class1", "class2"]
    assert engine.checkpoint_name == "checkpoint.npz" and engine.weights_name == "model.npz"


def test_training_calls_on_batch_after_each_batch_and_learns():
    engine = NumpyEngine(make_spec(epochs=4, lr_schedule="constant", warmup_epochs=0),
                         dataset=toy_dataset())
    calls = []
    first = engine.train_one_epoch(1, lambda b, n: calls.append((b, n)))
    assert calls == [(b, 6) for b in range(1, 7)]  # ceil(90 / 16)
    assert first.images == 90 and first.seconds > 0 and math.isfinite(first.loss)
    later = train_epochs(engine, 2, 4)
    assert later[-1] < first.loss
    result = engine.evaluate()
    assert result.y_true.shape == result.y_pred.shape == (30,)
    assert result.y_pred.dtype == np.int64
    assert result.top5 is None  # 3 classes
    assert np.mean(result.y_true == result.y_pred) > 0.8


def test_top5_is_reported_beyond_five_classes():
    engine = NumpyEngine(make_spec(), dataset=toy_dataset(classes=8, train=64, test=40))
    result = engine.evaluate()
    accuracy = float(np.mean(result.y_true == result.y_pred))
    assert result.top5 is not None and accuracy <= result.top5 <= 1.0


def test_evaluation_loss_is_the_mean_cross_entropy():
    engine = NumpyEngine(make_spec(), dataset=toy_dataset())
    logits = engine.model.forward(engine.test_x, train=False).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(30), engine.test_y].mean()
    assert engine.evaluate().loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "adamax"])
def test_resume_after_an_epoch_reproduces_an_uninterrupted_run(optimizer, tmp_path):
    spec = make_spec(optimizer=optimizer, weight_decay=0.01)
    data = toy_dataset()
    straight = NumpyEngine(spec, dataset=data)
    straight_losses = train_epochs(straight, 1, 3)

    first = NumpyEngine(spec, dataset=data)
    losses = train_epochs(first, 1, 2)
    path = tmp_path / first.checkpoint_name
    first.save_checkpoint(path, 2, spec.model_dump(mode="json"))
    resumed = NumpyEngine(spec, dataset=data)
    assert resumed.load_checkpoint(path) == 2
    assert resumed.current_lr() == pytest.approx(spec.effective_lr * lr_factor(2, 3, 1, "cosine"))
    losses += train_epochs(resumed, 3, 3)

    assert losses == straight_losses
    for name, value in straight.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[name], value, err_msg=name)
    a, b = straight.evaluate(), resumed.evaluate()
    assert a.loss == b.loss and np.array_equal(a.y_pred, b.y_pred)


def test_checkpoint_holds_model_optimizer_rng_epoch_and_spec(tmp_path):
    spec = make_spec()
    engine = NumpyEngine(spec, dataset=toy_dataset())
    train_epochs(engine, 1, 1)
    path = tmp_path / "checkpoint.npz"
    engine.save_checkpoint(path, 1, spec.model_dump(mode="json"))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temp file left
    with np.load(path, allow_pickle=False) as data:
        assert int(data["epoch"]) == 1
        assert json.loads(str(data["spec"]))["model"] == "numpy-cnn"
        assert json.loads(str(data["rng_state"]))["bit_generator"] == "PCG64"
        assert int(data["optim/step"]) == 6
        assert {"model/0.weight", "optim/0.weight/exp_avg", "optim/0.weight/exp_inf"} <= set(
            data.files)


def test_foreign_or_mismatched_checkpoints_are_data_errors(tmp_path):
    spec = make_spec()
    engine = NumpyEngine(spec, dataset=toy_dataset())
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="checkpoint damaged; delete it to start over"):
        engine.load_checkpoint(junk)
    other = NumpyEngine(spec, dataset=toy_dataset(classes=4))
    path = tmp_path / "checkpoint.npz"
    other.save_checkpoint(path, 1, spec.model_dump(mode="json"))
    with pytest.raises(DataError, match="4 classes"):
        engine.load_checkpoint(path)


def test_learning_rate_follows_warmup_and_cosine():
    spec = make_spec(epochs=4, warmup_epochs=1, lr=0.01)
    engine = NumpyEngine(spec, dataset=toy_dataset())
    rates = []
    for epoch in range(1, 5):
        rates.append(engine.current_lr())
        engine.train_one_epoch(epoch, no_op)
        assert engine.optimizer.lr == rates[-1]
    assert rates == pytest.approx([0.005, 0.01, 0.01 * (1 + math.cos(math.pi / 3)) / 2,
                                   0.01 * (1 + math.cos(2 * math.pi / 3)) / 2])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow on the way to NaN
def test_huge_learning_rate_raises_training_diverged():
    """Softmax cross-entropy stays finite for huge finite logits and ReLU networks tend to
    die rather than explode, so large inputs help lr=10 overflow float32 within a batch."""
    spec = make_spec(lr=10.0, optimizer="adamax", lr_schedule="constant", warmup_epochs=0)
    engine = NumpyEngine(spec, dataset=toy_dataset(scale=1e30))
    with pytest.raises(TrainingDiverged) as raised:
        train_epochs(engine, 1, 3)
    assert (raised.value.epoch, raised.value.batch) == (1, 2)
    assert "NaN or inf" in str(raised.value)


def test_on_batch_can_cancel_between_batches():
    engine = NumpyEngine(make_spec(), dataset=toy_dataset())
    seen = []

    def cancel_at_two(batch: int, batches: int) -> None:
        seen.append(batch)
        if batch == 2:
            raise JobCancelled()

    before = engine.optimizer.step_count
    with pytest.raises(JobCancelled):
        engine.train_one_epoch(1, cancel_at_two)
    assert seen == [1, 2] and engine.optimizer.step_count == before + 2


def test_saved_weights_load_into_the_default_network(tmp_path):
    engine = NumpyEngine(make_spec(), dataset=toy_dataset(size=12, channels=3))
    path = tmp_path / engine.weights_name
    engine.save_weights(path)
    model: Sequential = build_default_cnn(3, 12, 3)
    model.load(path)
    x = engine.test_x[:4]
    np.testing.assert_array_equal(model.forward(x), engine.model.forward(x, train=False))


def test_runs_on_the_bundled_digits_through_worker_data():
    spec = make_spec(dataset="digits", epochs=1, warmup_epochs=0, limit_train=128,
                     limit_test=64, batch_size=32)
    engine = NumpyEngine(spec)
    assert engine.num_classes == 10 and engine.train_x.shape[1:] == (1, 8, 8)
    result = engine.train_one_epoch(1, no_op)
    assert result.images == 128 and math.isfinite(result.loss)
    assert engine.evaluate().top5 is not None
