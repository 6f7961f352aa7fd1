"""Deterministic subsets for ``limit_train`` / ``limit_test``."""

from __future__ import annotations

import numpy as np

#: Distinct streams so the train and test subsets are independent draws from one seed.
TRAIN_STREAM, TEST_STREAM = 0, 1


def subset_indices(n: int, limit: int | None, seed: int, stream: int) -> np.ndarray:
    """Indices (sorted, int64) of a random subset of ``min(limit, n)`` out of ``n`` items.

    The same (n, limit, seed, stream) always gives the same subset; ``limit=None`` or
    ``limit >= n`` keeps everything in the original order.
    """
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, stream])
    # Sorted so a subset keeps the on-disk order (friendlier for file reads and debugging).
    return np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)
