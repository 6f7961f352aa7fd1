"""Classification metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion

from labctl.worker.evaluation import (
    accuracy,
    confusion_matrix,
    f1_macro,
    per_class_accuracy,
)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), c=st.integers(2, 12), seed=st.integers(0, 2**31))
def test_metrics_match_sklearn(n, c, seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, c, n), rng.integers(0, c, n)
    cm = confusion_matrix(y_true, y_pred, c)
    np.testing.assert_array_equal(cm, sk_confusion(y_true, y_pred, labels=range(c)))
    assert np.isclose(accuracy(y_true, y_pred), accuracy_score(y_true, y_pred))
    assert np.isclose(f1_macro(cm), f1_score(y_true, y_pred, average="macro", zero_division=0))


def test_per_class_accuracy_marks_absent_classes():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert per_class_accuracy(cm) == [0.5, 1.0, None]
