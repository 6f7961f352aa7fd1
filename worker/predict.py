"""Classify image files with a finished job's final weights (``labctl predict``).

The weights are the job's ``model.npz`` (numpy-cnn) or ``model.pt`` (resnet50); each image
is preprocessed as the job's test split was (``worker.data.predict_inputs``), and the
network's softmax gives every class a probability. Problems with the weights or an image
raise :class:`DataError`, a device that is not here :class:`SpecError`, each one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from labctl.shared.spec import JobSpec, SpecError, check_device
from labctl.worker.engine import DataError

#: Images per forward pass; only memory depends on it, not the results.
PREDICT_BATCH = 32
#: The final weights' file name per model (the engines' ``weights_name``).
WEIGHTS_NAME = {"numpy-cnn": "model.npz", "resnet50": "model.pt"}


@dataclass(frozen=True)
class ClassScore:
    index: int          # the model's output (the dataset's label)
    name: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    image: str
    top: list[ClassScore]  # most probable first


class Predictor(Protocol):
    class_names: list[str]

    def probabilities(self, paths: Sequence[str]) -> np.ndarray:
        """(len(paths), num_classes) float64 softmax outputs, each row summing to 1."""


def weights_path(job_folder: Path, model: str) -> Path:
    return Path(job_folder) / WEIGHTS_NAME[model]


def class_names_of(spec: JobSpec, summary: dict[str, Any] | None) -> list[str]:
    """The job's class names in label order: its summary's, or (a job finished before
    summaries listed them) its dataset's."""
    names = (summary or {}).get("class_names")
    if names:
        return [str(name) for name in names]
    from labctl.worker.data import dataset_class_names

    return dataset_class_names(spec)


def load_predictor(spec: JobSpec, weights: Path, class_names: list[str],
                   device: str = "cpu") -> Predictor:
    """A predictor holding the job's network with ``weights`` loaded, on ``device``."""
    if spec.model == "numpy-cnn":
        if device not in ("cpu", "auto"):
            raise SpecError("device", f"numpy-cnn runs on the CPU only, not {device}")
        return NumpyPredictor(spec, weights, class_names)
    check_device(device)
    return TorchPredictor(spec, weights, class_names, device)


def predict(predictor: Predictor, paths: Sequence[str], top_k: int) -> list[Prediction]:
    """The ``top_k`` most probable classes of each image (all of them if there are fewer).
    Every image is read before anything is returned, so a bad one fails the whole call."""
    rows = [predictor.probabilities(paths[i:i + PREDICT_BATCH])
            for i in range(0, len(paths), PREDICT_BATCH)]
    probabilities = np.concatenate(rows) if rows else np.empty((0, len(predictor.class_names)))
    k = min(top_k, probabilities.shape[1])
    predictions = []
    for path, row in zip(paths, probabilities, strict=True):
        order = np.argsort(-row, kind="stable")[:k]  # ties: the lower label first
        predictions.append(Prediction(str(path), [
            ClassScore(int(i), predictor.class_names[i], float(row[i])) for i in order]))
    return predictions


def _softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) logits -> (N, K) float64 probabilities."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _check_outputs(weights: Path, outputs: int, class_names: list[str]) -> None:
    if outputs != len(class_names):
        raise DataError(f"{weights} has {outputs} outputs but the job has "
                        f"{len(class_names)} classes")


class NumpyPredictor:
    """The NumPy CNN rebuilt for the job's input shape, with its final weights."""

    def __init__(self, spec: JobSpec, weights: Path, class_names: list[str]):
        from labctl.worker.numpy_cnn import build_default_cnn

        self.spec, self.class_names = spec, list(class_names)
        try:
            with np.load(weights, allow_pickle=False) as data:
                state = {name: data[name] for name in data.files}
            # The first convolution's weight is (out, in, 3, 3); the last layer's bias is
            # (classes,). Keys are "<layer index>.<parameter>", as torch's nn.Sequential.
            channels = int(state["0.weight"].shape[1])
            last = max(int(name.partition(".")[0]) for name in state)
            outputs = int(state[f"{last}.bias"].shape[0])
        except Exception as exc:  # truncated, not an npz, or not this network's keys
            raise DataError(f"cannot read the final weights {weights}: "
                            f"{type(exc).__name__}") from None
        _check_outputs(weights, outputs, self.class_names)
        self.model = build_default_cnn(channels, spec.effective_image_size, outputs)
        try:
            self.model.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            raise DataError(f"{weights} does not fit the job's network: {exc}") from None

    def probabilities(self, paths: Sequence[str]) -> np.ndarray:
        from labctl.worker.data.predict_inputs import numpy_inputs

        logits = self.model.forward(numpy_inputs(self.spec, paths), train=False)
        return _softmax(logits)


class TorchPredictor:
    """Our ResNet50 with the job's final weights, in eval mode (BatchNorm's running stats)."""

    def __init__(self, spec: JobSpec, weights: Path, class_names: list[str], device: str):
        from labctl.worker.resnet import read_state_dict, resnet50
        from labctl.worker.torch_engine import resolve_device

        self.spec, self.class_names = spec, list(class_names)
        self.device = resolve_device(device)
        state = read_state_dict(weights)
        if "fc.weight" not in state:
            raise DataError(f"{weights} holds no ResNet50 classifier (fc.weight)")
        outputs = int(state["fc.weight"].shape[0])
        _check_outputs(weights, outputs, self.class_names)
        model = resnet50(num_classes=outputs)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # missing, unexpected or misshapen tensors
            raise DataError(f"{weights} does not fit resnet50: "
                            f"{str(exc).splitlines()[-1].strip()}") from None
        self.model = model.to(self.device).eval()

    def probabilities(self, paths: Sequence[str]) -> np.ndarray:
        import torch

        from labctl.worker.data.predict_inputs import torch_inputs

        dataset = torch_inputs(self.spec, paths)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            logits = self.model(images.to(self.device))
        return _softmax(logits.float().cpu().numpy())
