"""Can this process write job folders under the artefact store? Asked by ``labctl worker``
at start: a worker that cannot write would report ready, then fail every job it takes
within a tenth of a second, draining the queue into failures while healthy workers wait.
"""

from __future__ import annotations

import os
from pathlib import Path

from labctl.shared.artifacts import mkstemp_like_open

#: Less free space than this is "full": a job's first checkpoint would not fit (a numpy-cnn
#: checkpoint takes a few MB, a ResNet50 one about 280 MB).
MIN_FREE_BYTES = 64 * 2**20
#: What the probe writes: enough to need a data block, not just a directory entry.
PROBE_BYTES = 64 * 2**10


def store_problem(root: str | os.PathLike[str]) -> str | None:
    """Why job folders cannot be written under ``root`` (created if missing), or None."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        usage = os.statvfs(root)
    except OSError as exc:
        return f"cannot be created: {exc.strerror or exc}"
    free = usage.f_bavail * usage.f_frsize
    if free < MIN_FREE_BYTES:
        return (f"is full: {free / 2**20:.1f} MiB free, a worker needs at least "
                f"{MIN_FREE_BYTES // 2**20} MiB")
    try:
        probe = mkstemp_like_open(root, prefix=".labctl-write-probe-")
    except OSError as exc:
        return f"is not writable: {exc.strerror or exc}"
    try:
        with open(probe, "wb") as out:
            out.write(b"\0" * PROBE_BYTES)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        return f"is not writable: {exc.strerror or exc}"
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None
