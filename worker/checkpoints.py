"""The resumable checkpoint in a job folder: its file name per model, how it is opened,
and when it counts as damaged.

Two formats: ``checkpoint.npz`` (the NumPy CNN: a zip of ``.npy`` arrays written by
``np.savez``) and ``checkpoint.pt`` (the ResNet50: ``torch.save``'s zip, read with
``weights_only=True``). Either one can be found torn (a full disk, a copy cut short),
overwritten with something else, or hand-edited. Every such file is refused with one line,
"checkpoint damaged; delete it to start over", and never with the loader's own advice
(NumPy's and torch's both suggest loading with pickling enabled, which would run whatever
code the file holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from labctl.worker.engine import DataError

#: Where each model's engine keeps its resumable state, and its final weights.
CHECKPOINT_NAMES = {"numpy-cnn": "checkpoint.npz", "resnet50": "checkpoint.pt"}
WEIGHTS_NAMES = {"numpy-cnn": "model.npz", "resnet50": "model.pt"}
#: Written into every checkpoint, so a foreign or older file is told apart from ours.
CHECKPOINT_FORMATS = {"numpy-cnn": "labctl.numpy-cnn.v1", "resnet50": "labctl.resnet50.v1"}


class CheckpointDamaged(DataError):
    """A checkpoint that cannot be resumed from. A ``DataError``: the job fails as bad input
    (exit 2 for ``labctl run``), its folder otherwise untouched."""

    def __init__(self, path: Path | str, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"checkpoint damaged; delete it to start over: {path} ({why})")


def checkpoint_path(folder: Path, model: str) -> Path:
    return Path(folder) / CHECKPOINT_NAMES[model]


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` checkpoint, read eagerly (a torn member fails here, not
    halfway through restoring the model)."""
    _refuse_empty(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except PermissionError:
        raise _unreadable(path) from None
    except Exception:  # BadZipFile, zlib.error, EOFError, and for a file that is no archive
        # at all, a ValueError whose text advises allow_pickle=True: never repeated.
        raise CheckpointDamaged(path, "not a readable .npz archive") from None


def read_torch(path: Path, *, lazy: bool = False) -> Any:
    """A ``torch.save`` file, loaded with ``weights_only=True`` on the CPU. ``lazy`` maps the
    file instead of reading it (enough to look at its epoch)."""
    import torch  # only resnet50 jobs pay for it

    _refuse_empty(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except PermissionError:
        raise _unreadable(path) from None
    except Exception:  # torn zip, garbage, a pickle of code (its message says weights_only=False)
        raise CheckpointDamaged(path, "not a readable PyTorch archive") from None


def _refuse_empty(path: Path) -> None:
    """What a full disk typically leaves (the loaders' own words for it differ)."""
    try:
        empty = Path(path).stat().st_size == 0
    except OSError:
        return  # the loader says what is wrong
    if empty:
        raise CheckpointDamaged(path, "the file is empty")


def _unreadable(path: Path) -> DataError:
    # Not damaged: the file may be fine, and deleting it would lose the run's progress.
    return DataError(f"cannot read checkpoint {path}: permission denied")


def checked_epoch(path: Path, epoch: Any, epochs: int) -> int:
    """The epoch a checkpoint says it was taken after, if a job of ``epochs`` epochs can
    resume from it: a whole number from 0 to ``epochs``. Otherwise :class:`CheckpointDamaged`
    (an epoch of -5 would otherwise have the resume drop every metrics row)."""
    if isinstance(epoch, np.ndarray) and epoch.shape == () and epoch.dtype.kind in "iu":
        epoch = int(epoch)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise CheckpointDamaged(path, "its epoch is not a whole number")
    if epoch < 0:
        raise CheckpointDamaged(path, f"its epoch {epoch} is negative")
    if epoch > epochs:
        raise CheckpointDamaged(path, f"its epoch {epoch} is past the job's {epochs} epochs")
    return epoch


def peek_epoch(path: Path, model: str) -> Any:
    """The epoch a checkpoint records, without building an engine (no data is loaded);
    unchecked: pass it to :func:`checked_epoch`. Raises :class:`CheckpointDamaged` for a
    file that is no checkpoint of ``model``'s."""
    if model == "numpy-cnn":
        arrays = read_npz(path)
        if str(arrays.get("format", "")) != CHECKPOINT_FORMATS[model]:
            raise CheckpointDamaged(path, f"not a {CHECKPOINT_FORMATS[model]} checkpoint")
        return arrays.get("epoch")
    state = read_torch(path, lazy=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMATS[model]:
        raise CheckpointDamaged(path, f"not a {CHECKPOINT_FORMATS[model]} checkpoint")
    return state.get("epoch")
