"""Sweep ids and the sweep manifest, so compare/report find a sweep from artefacts alone.

``<artifacts>/sweeps/<sweep_id>.json``::

    {"sweep_id": ..., "created_at": ..., "mode": "local" | "queue",
     "base": {spec values shared by every job},
     "grid": {field: [values], ...},          # the fields that vary, in grid order
     "jobs": [{"job_id": ..., "params": {field: value, ...}}, ...],
     "env": {"OMP_NUM_THREADS": "1", ...},   # thread settings of a local sweep
     "seeds": 3 | null, "artifacts_dir": "..." | null}   # --seeds / --artifacts-dir as given
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labctl.shared.artifacts import read_json, utc_now, write_json
from labctl.shared.spec import NAME_PATTERN

SWEEPS_DIR = "sweeps"
_NAME = re.compile(NAME_PATTERN)


def new_sweep_id(now: datetime | None = None) -> str:
    """``sw-20261128-201500-abc123``: sorts by time and never parses as a job id."""
    now = now or datetime.now(UTC)
    return f"sw-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def is_sweep_name(text: str) -> bool:
    # Same rule as spec names; it also keeps "/" and ".." out of the manifest path.
    return bool(_NAME.fullmatch(text))


def manifest_path(root: str | Path, sweep_id: str) -> Path:
    if not is_sweep_name(sweep_id):
        raise ValueError(f"invalid sweep id {sweep_id!r}")
    return Path(root) / SWEEPS_DIR / f"{sweep_id}.json"


#: Settings outside the spec that change a local run's speed; recorded so the manifest's
#: command reproduces the timings too.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "LABCTL_NUMPY_THREADS")


def thread_env() -> dict[str, str]:
    return {name: os.environ[name] for name in THREAD_VARS if os.environ.get(name)}


def write_manifest(root: str | Path, sweep_id: str, *, mode: str, base: dict[str, Any],
                   grid: dict[str, list[Any]], jobs: list[dict[str, Any]],
                   env: dict[str, str] | None = None, seeds: int | None = None,
                   artifacts_dir: str | None = None, created_at: str | None = None) -> Path:
    """``seeds`` / ``artifacts_dir``: the --seeds and --artifacts-dir given, if any, so
    the manifest's command line is the one that was typed."""
    path = manifest_path(root, sweep_id)
    write_json(path, {"sweep_id": sweep_id, "created_at": created_at or utc_now(),
                      "mode": mode, "base": base, "grid": grid, "jobs": jobs,
                      "env": env or {}, "seeds": seeds, "artifacts_dir": artifacts_dir})
    return path


def read_manifest(root: str | Path, sweep_id: str) -> dict[str, Any] | None:
    if not is_sweep_name(sweep_id):
        return None
    return read_json(manifest_path(root, sweep_id))
