"""How a job's end reaches both of its stores, decided in one place.

The runner writes the end into the job folder (``status.json``), then its reporter writes
it into the Redis record: that is the normal path, one writer each. Two cases break it, and
both are settled here by one rule (``shared/jobstate.py`` says which store owns what):

- **The folder recorded an end the record never got** (Redis was unreachable at the very
  end, so the reaper requeued the job): the folder wins. The next attempt copies the end
  into the record instead of training again (:func:`end_recorded_in_folder`).
- **The record ended a job no runner ended** (the reaper failed it after repeated worker
  losses, or it was cancelled while it waited to be requeued): the record's end is mirrored
  into the folder, never over an end the folder recorded (:func:`mirror_record_end`).
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from labctl.shared.artifacts import ArtifactStore, JobFolder, utc_now
from labctl.shared.jobstate import is_terminal
from labctl.shared.records import JobRecords

log = logging.getLogger(__name__)


def record_summary(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of summary.json the job record keeps (the rest stays in the folder)."""
    summary = summary or {}
    return {k: summary[k] for k in ("final", "best", "total_seconds") if k in summary} or None


def end_recorded_in_folder(records: JobRecords, store: ArtifactStore, job_id: str,
                           owner: str) -> str | None:
    """If the job's folder says it ended, copy that end into the record (held by ``owner``)
    and return the state; else None: the job is to be run."""
    folder = store.job(job_id)
    status = _read_or_none(folder.read_status) or {}
    if not is_terminal(status.get("state")):
        return None
    records.update_owned(job_id, owner, state=status["state"], error=status.get("error"),
                         finished_at=status.get("finished_at") or utc_now(),
                         summary=record_summary(_read_or_none(folder.read_summary)))
    log.warning("job %s had already ended %s; record corrected", job_id, status["state"])
    return status["state"]


def mirror_record_end(records: JobRecords, store: ArtifactStore, job_id: str) -> None:
    """Write the record's end into the job's folder when no runner did."""
    try:
        record = records.get(job_id) or {}
    except redis.RedisError:
        return  # the folder keeps its state; the record stays the truth
    if mirror_end_into_folder(store.job(job_id), record):
        log.info("job %s: folder status set to %s, as its record says", job_id, record["state"])


def mirror_end_into_folder(folder: JobFolder, record: dict[str, Any]) -> bool:
    """Copy a record's end into ``folder``'s status.json, so the folder does not say
    "running" forever. Only a folder that exists and has not ended itself is touched;
    returns whether it was."""
    if not is_terminal(record.get("state")) or not folder.exists():
        return False
    try:
        if is_terminal(folder.read_status().get("state")):
            return False
        folder.update_status(state=record["state"], error=record.get("error"),
                             finished_at=record.get("finished_at") or utc_now())
    except (OSError, ValueError):  # unwritable or corrupt: the record stays the truth
        return False
    return True


def _read_or_none(read: Any) -> Any:
    try:
        return read()
    except (OSError, ValueError):  # unreadable or corrupt: as if it were not there
        return None
