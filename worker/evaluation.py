"""Classification metrics in NumPy: accuracy, macro-F1, confusion matrix, per-class accuracy."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64; rows are true classes, columns predictions."""
    idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0


def f1_macro(cm: np.ndarray) -> float:
    """Macro-F1 over the classes present in the truth or the predictions (as scikit-learn
    computes it with ``labels`` defaulting to the union of both)."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        return 0.0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean())


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Recall of each class; ``None`` for a class absent from the test split."""
    support = cm.sum(axis=1)
    return [float(cm[i, i] / support[i]) if support[i] else None for i in range(len(cm))]

