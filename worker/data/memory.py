"""Refusing a dataset too big for this host's memory, with the estimate, before loading it.

The loaders hold whole splits as float32 arrays (the NumPy engine; the torch engine for the
small datasets at their native size). A spec asking for more than the host can give used to
be found out by the kernel's OOM killer, or by a MemoryError after minutes of decoding:
``--image-size 1024`` on digits is 7 GiB. Each loader calls :func:`check_fits` once it knows
how many images it keeps (limits applied) and before it allocates their pixels.
"""

from __future__ import annotations

from pathlib import Path

from labctl.worker.engine import DataError

FLOAT32_BYTES = 4
#: cgroup v1 reports "no limit" as a number near 2**63.
_NO_LIMIT = 2**60


def check_fits(dataset: str, train: int, test: int, channels: int, size: int) -> None:
    """Raise :class:`DataError` if ``train + test`` images of ``(channels, size, size)``
    float32 need more memory than this process can still get."""
    need = (train + test) * channels * size * size * FLOAT32_BYTES
    available = available_memory_bytes()
    if available is not None and need > available:
        raise DataError(
            f"dataset {dataset} at {size} px needs about {gib(need)} of memory ({train:,} "
            f"train + {test:,} test images of {channels}x{size}x{size} float32), more than "
            f"the {gib(available)} this host has available; lower --image-size or set "
            "--limit-train / --limit-test")


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def available_memory_bytes() -> int | None:
    """Memory this process may still allocate: the kernel's MemAvailable, or less if a
    cgroup (a container's memory limit) leaves less. None where neither can be read."""
    candidates = [value for value in (_meminfo_available(), _cgroup_headroom())
                  if value is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


#: (limit, usage, statistics, the statistic counting page cache the kernel can drop):
#: cgroup v2, then v1.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
     "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def _cgroup_headroom() -> int | None:
    for limit_file, usage_file, stat_file, reclaimable in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= _NO_LIMIT:
            return None
        # Usage counts the page cache too (the data files just read); the kernel drops
        # its inactive part before it would kill anything.
        return max(0, int(limit) - usage + _stat(stat_file, reclaimable))
    return None


def _stat(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
