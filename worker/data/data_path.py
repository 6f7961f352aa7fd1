"""Which input path a ResNet50 job on photos takes: decode once and augment on the device
(``cache``), or decode every JPEG every epoch in DataLoader workers (``stream``).

``spec.data_path`` says ``cache`` or ``stream`` outright; ``auto`` (the default) caches
unless the decoded images would exceed a budget: ``LABCTL_DATA_CACHE_MAX_GB``, half the free
memory of a CUDA device (the cache is copied there), or the free space where the cache files
go. Over budget, the job streams and says so in one line.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from labctl.shared.spec import PHOTO_DATASETS

if TYPE_CHECKING:
    from labctl.shared.spec import JobSpec

log = logging.getLogger(__name__)

#: Width / height of a typical photo (Stanford Cars averages ~700 x 480), for the estimate
#: made before any file is opened.
TYPICAL_ASPECT = 1.5
#: Of a CUDA device's free memory, the share the cache may take; the rest is the model's.
DEVICE_SHARE = 0.5


@dataclass(frozen=True)
class DataPathChoice:
    mode: str  # "cache" or "stream"
    notice: str | None = None  # one line for the job's log when auto fell back to streaming


def estimated_cache_bytes(num_images: int, short: int) -> int:
    """Decoded uint8 bytes of ``num_images`` photos at shorter side ``short``."""
    return int(num_images * 3 * short * round(short * TYPICAL_ASPECT))


def choose_data_path(spec: JobSpec, num_images: int, short: int, device: torch.device,
                     cache_dir: Path | None, max_gb: float,
                     already_cached: bool = False) -> DataPathChoice:
    """``cache`` or ``stream`` for a job on ``spec.dataset``; see the module docstring.
    ``already_cached``: the cache files exist, so the disk needs no room for them."""
    if spec.dataset not in PHOTO_DATASETS:
        return DataPathChoice("stream")  # small in-memory arrays: nothing to decode
    if spec.data_path != "auto":
        return DataPathChoice(spec.data_path)
    need = estimated_cache_bytes(num_images, short)
    limits = [(max_gb * 1e9, "LABCTL_DATA_CACHE_MAX_GB")]
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        limits.append((free * DEVICE_SHARE, f"half the free memory of {device}"))
    if cache_dir is not None and not already_cached:
        limits.append((_free_disk(cache_dir), f"the free disk space in {cache_dir}"))
    for limit, what in limits:
        if need > limit:
            notice = (f"data_path auto: {num_images} decoded images (~{_size(need)}) "
                      f"exceed {what} ({_size(limit)}); streaming JPEGs instead")
            log.warning("%s", notice)
            return DataPathChoice("stream", notice)
    return DataPathChoice("cache")


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e3:.1f} kB"


def _free_disk(folder: Path) -> float:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return float(shutil.disk_usage(probe).free)
    except OSError:
        return float("inf")  # unknown: let the write itself fail and say so (cache.py)
