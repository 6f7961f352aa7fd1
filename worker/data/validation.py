"""A validation split carved from the training split, so tuning never looks at the test split.

With ``spec.validation`` set (a fraction), a job trains on the rest of its training split
and evaluates on the carved part in the slot the test split would take; the test split is
not read at all. The carving is stratified (each class gives the same fraction) and seeded
by a constant, not by ``spec.seed``: every trial of a study, whatever its seed, is scored
on the same images, as the test split is the same for every job.
"""

from __future__ import annotations

import numpy as np

#: Seed of the carving: one validation split per (dataset, limit_train, fraction).
VALIDATION_SPLIT_SEED = 0
#: A stream apart from the limit_* subsets' (subset.py), so the two draws are independent.
VALIDATION_STREAM = 2


def validation_indices(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out): sorted int64 indices into ``labels`` (N,), disjoint, covering all N.

    Each class with n members gives ``round(fraction * n)`` of them to ``held_out``, keeping
    at least one for training, so the class proportions of both parts match the whole.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng([VALIDATION_SPLIT_SEED, VALIDATION_STREAM])
    held_out = []
    # Classes in sorted order and one generator: the draw depends on the labels alone.
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = min(int(np.floor(fraction * len(members) + 0.5)), len(members) - 1)
        if count > 0:
            held_out.append(rng.choice(members, size=count, replace=False))
    held = np.sort(np.concatenate(held_out)) if held_out else np.empty(0, np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held.astype(np.int64)
