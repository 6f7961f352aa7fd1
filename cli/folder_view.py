"""A job as its folder tells it, for jobs Redis has no record of.

Two kinds: jobs trained with ``labctl run`` (never queued), and queued jobs whose record
Redis lost (restarted without persistence, or replaced). The folder is the durable copy;
what it cannot say is whether its writer is still alive, except through the folder lock
(``shared/folder_lock.py``): a folder that says "running" while no process on this host
holds it, and whose last holder was on this host, is *abandoned* (its run was killed).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from labctl.cli.errors import DamagedJobFile
from labctl.shared import folder_lock
from labctl.shared.artifacts import ArtifactStore, JobFolder
from labctl.shared.jobstate import JobState

#: Shown, never stored: a run that stopped without recording an end.
ABANDONED = "abandoned"
#: ``source`` of a view read from a folder (records read from Redis have none).
FROM_FOLDER = "folder"


def run_state(folder: JobFolder, state: str | None) -> str | None:
    """``state`` as status.json has it, or ``abandoned`` for a dead writer on this host."""
    if state != JobState.RUNNING or folder_lock.holder(folder.path) is not None:
        return state
    if folder_lock.last_holder_host(folder.path) == socket.gethostname():
        return ABANDONED
    return state  # written on another host (or before folders had locks): cannot tell


def folder_record(folder: JobFolder) -> dict[str, Any] | None:
    """The job's record as its folder knows it, or None if the folder holds no job.
    Raises ``ValueError`` / ``OSError`` for an unreadable status.json or spec.json."""
    status = folder.read_status()
    if not status:
        return None
    spec = folder.read_spec() or {}
    record = {key: spec.get(key) for key in ("model", "optimizer", "dataset", "name",
                                             "sweep_id", "priority")}
    record.update(status)
    record.setdefault("id", folder.job_id)
    record.setdefault("epochs", spec.get("epochs"))
    record["state"] = run_state(folder, status.get("state"))
    record.setdefault("artifacts", str(folder.path))
    record["source"] = FROM_FOLDER
    if record["state"] == ABANDONED:
        record["error"] = (f"its run stopped without ending; resume it with labctl run "
                           f"--resume {folder.job_id}")
    return record


def damaged_folder(folder: JobFolder, exc: BaseException) -> DamagedJobFile:
    """The one line for a job folder whose status.json or spec.json cannot be read."""
    if isinstance(exc, OSError):
        name = Path(exc.filename).name if exc.filename else "a file of its folder"
        what = f"{name} cannot be read ({exc.strerror or exc})"
    else:  # DamagedFile names the file
        what = str(exc)
    return DamagedJobFile(f"job {folder.job_id}: {what} in {folder.path}")


def folder_records(store: ArtifactStore, skip: set[str] = frozenset(),
                   state: str | None = None) -> list[dict[str, Any]]:
    """Views of every readable job folder in ``store`` not in ``skip``, newest first."""
    found = []
    for job_id in reversed(store.job_ids()):  # ids sort by creation time
        if job_id in skip:
            continue
        try:
            record = folder_record(store.job(job_id))
        except (ValueError, OSError):
            continue  # a damaged folder is `labctl status`'s to report, not list's
        if record and (state is None or record["state"] == state):
            found.append(record)
    return found
