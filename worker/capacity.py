"""What one worker can give a data-parallel job: its GPUs and its CPU cores.

Announced with the worker's presence key (``labctl:worker:<name>``, renewed by its reaper)
so ``labctl submit`` can refuse a job no live worker could run, and checked again when a
job arrives, for workers that joined later or a submit that could not know.
"""

from __future__ import annotations

import functools
import os

#: ``labctl worker --gpus 0,1,2,3`` sets it (with CUDA_VISIBLE_DEVICES): the GPUs this
#: worker's jobs may use, rank r on the r-th of them.
GPUS_ENV = "LABCTL_GPUS"


def parse_gpus(value: str) -> list[int]:
    """``"0,1,2,3"`` -> ``[0, 1, 2, 3]``; raises ValueError naming what is wrong."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise ValueError(f"expected GPU indices such as 0,1,2,3, got {value!r}")
    gpus = [int(item) for item in items]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"GPU listed twice in {value!r}")
    return gpus


@functools.lru_cache(maxsize=1)
def worker_capacity() -> dict[str, int]:
    """``{"gpus": N, "cpus": M}`` for this process: the ``--gpus`` list if given, else the
    CUDA devices torch sees (counted without initialising CUDA)."""
    listed = os.environ.get(GPUS_ENV)
    if listed:
        gpus = len(parse_gpus(listed))
    else:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:  # no torch, or a broken driver: no GPUs to offer
            gpus = 0
    return {"gpus": gpus, "cpus": os.cpu_count() or 1}
