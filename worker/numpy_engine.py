"""The NumPy engine: our from-scratch CNN (``worker.numpy_cnn``) trained with Adam or AdaMax,
driven by ``worker.runner`` exactly like the torch engine.

Determinism: the initial weights and the shuffling come from two numpy Generators spawned
from ``spec.seed``; the shuffling generator's state goes into every checkpoint with the
weights, the optimizer state and the epoch, and the computation itself is reproducible
(chunks fixed by batch size and thread count, reductions in a fixed order), so resuming
after epoch k on the same machine ends with the same weights, bit for bit, as an
uninterrupted run. The learning rate is set per epoch from the spec (warm-up, then constant
or cosine), so a job resumed with more epochs follows its new schedule.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from labctl.shared.artifacts import atomic_path
from labctl.shared.spec import JobSpec
from labctl.worker.checkpoints import (
    CHECKPOINT_FORMATS,
    CHECKPOINT_NAMES,
    WEIGHTS_NAMES,
    CheckpointDamaged,
    read_npz,
)
from labctl.worker.engine import BatchCallback, DataError, EvalResult, TrainingDiverged, TrainResult
from labctl.worker.numpy_cnn import Adam, AdaMax, build_default_cnn, softmax_cross_entropy
from labctl.worker.numpy_cnn.losses import log_softmax
from labctl.worker.numpy_cnn.optim import Optimizer
from labctl.worker.schedule import lr_factor

CHECKPOINT_FORMAT = CHECKPOINT_FORMATS["numpy-cnn"]
#: Images per forward pass in evaluate(); only memory depends on it, not the results.
EVAL_BATCH = 256
OPTIMIZERS: dict[str, type[Optimizer]] = {"adam": Adam, "adamax": AdaMax}



def _load_dataset(spec: JobSpec):
    from labctl.worker.data import load_arrays  # the data package is only needed to run a job

    return load_arrays(spec)


class NumpyEngine:
    """Implements :class:`worker.engine.Engine` for ``spec.model == "numpy-cnn"``.

    ``dataset`` (an ``ArrayDataset``) skips ``worker.data.load_arrays``; tests and
    benchmarks use it to train on arrays they made.
    """

    checkpoint_name = CHECKPOINT_NAMES["numpy-cnn"]
    weights_name = WEIGHTS_NAMES["numpy-cnn"]

    def __init__(self, spec: JobSpec, dataset: Any = None) -> None:
        self.spec = spec
        data = dataset if dataset is not None else _load_dataset(spec)
        self.train_x, self.train_y = data.train.x, np.asarray(data.train.y, np.int64)
        self.test_x, self.test_y = data.test.x, np.asarray(data.test.y, np.int64)
        self.class_names = list(data.class_names)
        self.num_classes = len(self.class_names)
        self.train_size, self.test_size = len(self.train_y), len(self.test_y)
        if self.train_size == 0:
            raise DataError(f"the training split of {spec.dataset!r} is empty")

        init_seed, shuffle_seed = np.random.SeedSequence(spec.seed).spawn(2)
        channels, height, width = self.train_x.shape[1:]
        self.model = build_default_cnn(channels, (height, width), self.num_classes,
                                       np.random.default_rng(init_seed))
        self.shuffle_rng = np.random.default_rng(shuffle_seed)
        self.optimizer = OPTIMIZERS[spec.optimizer](
            self.model.layers, lr=spec.effective_lr, betas=spec.betas, eps=spec.eps,
            weight_decay=spec.weight_decay)
        self.epochs_done = 0
        self.optimizer.lr = self._lr_for_epoch(1)

    # -- training ---------------------------------------------------------------------------

    def _lr_for_epoch(self, epoch: int) -> float:
        spec = self.spec
        return spec.effective_lr * lr_factor(epoch - 1, spec.epochs, spec.warmup_epochs,
                                             spec.lr_schedule)

    def current_lr(self) -> float:
        """The rate the next epoch trains at."""
        return self._lr_for_epoch(self.epochs_done + 1)

    def train_one_epoch(self, epoch: int, on_batch: BatchCallback) -> TrainResult:
        self.optimizer.lr = self._lr_for_epoch(epoch)
        batch_size = self.spec.batch_size
        order = self.shuffle_rng.permutation(self.train_size)
        num_batches = -(-self.train_size // batch_size)
        total_loss = 0.0
        started = time.perf_counter()
        for batch in range(1, num_batches + 1):
            index = order[(batch - 1) * batch_size:batch * batch_size]
            # Overflow on the way to NaN is reported once, as TrainingDiverged, not as
            # NumPy warnings on the user's terminal.
            with np.errstate(over="ignore", invalid="ignore"):
                logits = self.model.forward(self.train_x[index])
                loss, grad = softmax_cross_entropy(logits, self.train_y[index])
            if not math.isfinite(loss):
                raise TrainingDiverged(epoch, batch)
            self.optimizer.zero_grad()
            with np.errstate(over="ignore", invalid="ignore"):
                self.model.backward(grad, input_grad=False)
                self.optimizer.step()
            total_loss += loss * len(index)
            on_batch(batch, num_batches)
        seconds = time.perf_counter() - started
        self.epochs_done = epoch
        return TrainResult(loss=total_loss / self.train_size, images=self.train_size,
                           seconds=seconds)

    def evaluate(self) -> EvalResult:
        total_loss, predictions, top5_hits = 0.0, [], 0
        for start in range(0, self.test_size, EVAL_BATCH):
            x = self.test_x[start:start + EVAL_BATCH]
            y = self.test_y[start:start + EVAL_BATCH]
            logits = self.model.forward(x, train=False)
            with np.errstate(invalid="ignore", over="ignore"):
                log_probs = log_softmax(logits)
            total_loss -= float(log_probs[np.arange(len(y)), y].sum(dtype=np.float64))
            predictions.append(logits.argmax(axis=1))
            if self.num_classes > 5:
                top5 = np.argpartition(-logits, 4, axis=1)[:, :5]
                top5_hits += int((top5 == y[:, None]).any(axis=1).sum())
        count = max(self.test_size, 1)
        y_pred = (np.concatenate(predictions) if predictions else np.empty(0)).astype(np.int64)
        return EvalResult(loss=total_loss / count, y_true=self.test_y.copy(), y_pred=y_pred,
                          top5=top5_hits / count if self.num_classes > 5 else None)

    # -- state ------------------------------------------------------------------------------

    def save_checkpoint(self, path: Path, epoch: int, spec: dict) -> None:
        """One npz: ``model/<param>``, ``optim/<name>/<buffer>``, ``optim/step``, the epoch,
        the shuffling generator's state and the spec (both as JSON strings)."""
        arrays: dict[str, np.ndarray] = {
            "format": np.array(CHECKPOINT_FORMAT),
            "epoch": np.array(epoch, np.int64),
            "num_classes": np.array(self.num_classes, np.int64),
            "rng_state": np.array(json.dumps(self.shuffle_rng.bit_generator.state)),
            "spec": np.array(json.dumps(spec, sort_keys=True)),
        }
        arrays.update({f"model/{k}": v for k, v in self.model.state_dict().items()})
        arrays.update({f"optim/{k}": v for k, v in self.optimizer.state_dict().items()})
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def load_checkpoint(self, path: Path) -> int:
        """Restore the state; returns the epoch as stored (the runner checks its range).
        Raises :class:`CheckpointDamaged` for a file that is no checkpoint of this job."""
        arrays = read_npz(path)
        if str(arrays.get("format", "")) != CHECKPOINT_FORMAT:
            raise CheckpointDamaged(path, f"not a {CHECKPOINT_FORMAT} checkpoint")
        try:
            num_classes, epoch = int(arrays["num_classes"]), int(arrays["epoch"])
            rng_state = json.loads(str(arrays["rng_state"]))
        except (KeyError, ValueError, TypeError):
            raise CheckpointDamaged(path, "its epoch, class count or generator state is "
                                          "missing or unreadable") from None
        if num_classes != self.num_classes:
            raise DataError(f"checkpoint {path} has {num_classes} classes, the data "
                            f"{self.num_classes}")
        try:
            self.model.load_state_dict(_strip(arrays, "model/"))
            self.optimizer.load_state_dict(_strip(arrays, "optim/"))
            self.shuffle_rng.bit_generator.state = rng_state
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointDamaged(path, f"it does not fit this network: {exc}") from None
        self.epochs_done = epoch
        self.optimizer.lr = self.current_lr()
        return epoch

    def save_weights(self, path: Path) -> None:
        """The parameters alone, loadable with ``worker.numpy_cnn.Sequential.load``."""
        with atomic_path(Path(path)) as tmp:
            self.model.save(tmp)


def _strip(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
