"""The learning-rate schedule both engines follow, free of torch so numpy jobs never load it."""

from __future__ import annotations

import math


def lr_factor(epoch_index: int, epochs: int, warmup_epochs: int, schedule: str) -> float:
    """Multiplier of the base learning rate during epoch ``epoch_index`` (0-based).

    Warm-up rises linearly, reaching the full rate on the first epoch after it (so epoch 0
    never trains at rate 0); cosine then decays towards 0, reached just after the last epoch.
    """
    if epoch_index < warmup_epochs:
        return (epoch_index + 1) / (warmup_epochs + 1)
    if schedule == "constant":
        return 1.0
    progress = (epoch_index - warmup_epochs) / max(1, epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
