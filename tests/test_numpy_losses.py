"""Labels the loss must refuse (its values are checked against torch in test_numpy_layers)."""

from __future__ import annotations

import numpy as np
import pytest

from labctl.worker.numpy_cnn.losses import softmax_cross_entropy


@pytest.mark.parametrize("labels", [[-1, 0], [0, 3], [7, 1]])
def test_labels_outside_the_classes_are_refused(labels):
    # As torch does: numpy indexing would read -1 as the last class and train on it.
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array(labels))

