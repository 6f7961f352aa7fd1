"""What the runner needs from a training engine, and the errors engines raise.

Two engines implement :class:`Engine`: ``worker.numpy_engine.NumpyEngine`` (our NumPy CNN)
and ``worker.torch_engine.TorchEngine`` (our ResNet50). The runner drives either one the
same way, so checkpoints, metrics, cancel and resume behave identically for both.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

#: Called after every training batch with (batch_index from 1, batches in the epoch).
#: It may raise :class:`JobCancelled` to stop the job between two batches.
BatchCallback = Callable[[int, int], None]


class JobCancelled(Exception):
    """Raised from a batch callback when the user cancelled the job."""


class RankLost(Exception):  # noqa: N818 - named for what happened, like JobCancelled
    """A rank of a data-parallel job died without an error of its own (killed by a signal:
    the OOM killer, a GPU fault, a kill -9). Nothing is wrong with the job: a worker hands
    it back to resume from its last checkpoint; ``labctl run`` fails it, resumable."""


class TrainingDiverged(Exception):
    def __init__(self, epoch: int, batch: int, why: str = "loss is NaN or inf"):
        self.epoch, self.batch = epoch, batch
        where = f"epoch {epoch}, batch {batch}" if batch else f"epoch {epoch}"
        super().__init__(f"diverged at {where}: {why}")


#: An epoch whose mean cross-entropy exceeds this many times chance level (ln C, what a
#: uniform guess scores) has diverged: no run that is learning gets there, and the loss may
#: stay finite for many epochs (measured: 4.5e8 with lr 10), wasting the GPU meanwhile.
DIVERGED_LOSS_FACTOR = 100.0


def check_not_diverged(loss: float, num_classes: int, epoch: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(epoch, 0)
    chance = math.log(max(num_classes, 2))
    if loss > DIVERGED_LOSS_FACTOR * chance:
        raise TrainingDiverged(epoch, 0, f"mean training loss {loss:.3g} is over "
                                         f"{DIVERGED_LOSS_FACTOR:g}x chance level "
                                         f"({chance:.2f})")


class DataError(Exception):
    """Missing or malformed data: the message says which file was expected where."""


@dataclass
class TrainResult:
    loss: float          # mean training loss over the epoch
    images: int          # images seen
    seconds: float       # wall time of the training pass alone


@dataclass
class EvalResult:
    loss: float
    y_true: np.ndarray   # (N,) int labels
    y_pred: np.ndarray   # (N,) int top-1 predictions
    top5: float | None = None  # top-5 accuracy where the model has >5 classes
    extra: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    num_classes: int
    train_size: int
    test_size: int
    class_names: list[str]
    #: file names inside the job folder, e.g. "checkpoint.npz" / "model.npz"
    checkpoint_name: str
    weights_name: str

    def train_one_epoch(self, epoch: int, on_batch: BatchCallback) -> TrainResult: ...

    def evaluate(self) -> EvalResult: ...

    def current_lr(self) -> float: ...

    def save_checkpoint(self, path: Path, epoch: int, spec: dict) -> None:
        """Write everything needed to resume after ``epoch`` (atomically)."""

    def load_checkpoint(self, path: Path) -> int:
        """Restore state and return the epoch the checkpoint was taken after, as stored (the
        runner checks its range). A file that is no checkpoint of this job raises
        ``worker.checkpoints.CheckpointDamaged``."""

    def save_weights(self, path: Path) -> None: ...


def seed_global_generators(seed: int) -> None:
    """Python's and NumPy's global generators, for any library that draws from them. Each
    engine seeds its own streams too (torch's in the torch engine), so a numpy-cnn job never
    imports torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
