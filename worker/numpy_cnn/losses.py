"""Softmax cross-entropy, the loss of the NumPy CNN."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits: (N, K) -> (N, K) log-probabilities. Shifting by the row maximum keeps exp()
    in [0, 1], so logits of 1e30 neither overflow nor lose the winning class."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over the batch and its gradient, as ``F.cross_entropy``.

    logits: (N, K) float; labels: (N,) int in [0, K).
    Returns ``(loss, grad_logits)``: a Python float and an (N, K) array of the logits' dtype,
    ``(softmax(logits) - one_hot(labels)) / N``. Non-finite logits give a non-finite loss
    (the engine's divergence check relies on it) rather than an exception.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, K) and labels (N,), got {logits.shape} and "
                         f"{labels.shape}")
    n, k = logits.shape
    # Numpy would read -1 as the last class and train on the wrong targets without a word.
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be in [0, {k}), got {labels.min()}..{labels.max()}")
    rows = np.arange(n)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN logits: report, don't warn
        log_probs = log_softmax(logits)
        loss = float(-log_probs[rows, labels].mean(dtype=np.float64))
        grad = np.exp(log_probs)
    grad[rows, labels] -= 1
    grad /= n
    return loss, grad.astype(logits.dtype, copy=False)
