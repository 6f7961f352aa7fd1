"""Every change of a job's state, in one module: the only code that writes a state (or any
field) into either of a job's two stores.

::

    submit -> queued -> claim -> running -> epoch done ... -> succeeded | failed | cancelled
                 ^                  |
                 +-- handed back ---+  (graceful shutdown: attempt + 1)
                 +-- worker lost ---+  (lease expired: attempt + 1, failed after N losses)
    queued -> cancel -> cancelled;  running -> cancel -> stops at its next batch

``shared/jobstate.py`` says which store owns which field. The two halves:

- **The queue's record** (Redis): :func:`queued` and :func:`unsent` (``labctl submit``),
  :func:`claim`, :func:`heartbeat`, :func:`progress`, :func:`ended` and :func:`hand_back`
  (the worker's task and reporter), :func:`restore_record` (the worker, when Redis lost
  the record of the job it runs), :func:`reap` (the reaper), :func:`cancel` (``labctl
  cancel``). The atomic steps are Lua scripts in ``shared.records``; this module decides
  when each runs and what else follows from it.
- **The job folder** (``status.json``): :func:`run_started`, :func:`run_progress` and
  :func:`run_ended`, called by the runner wherever the job runs (worker or ``labctl run``).
  The runner writes the artefacts themselves (rows, checkpoints, plots, summary) and the
  logs; only their state goes through here.

When the stores disagree about how a job ended, one rule settles it, here and nowhere else:
the folder wins if it recorded an end (the run wrote it just before its record, so the
record missed it only because Redis was unreachable at that moment); otherwise the record's
end is mirrored into the folder (a job the reaper failed, or cancelled while it waited to be
requeued). :func:`claim` applies the first half, :func:`reap` and :func:`claim` the second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple, TypeVar

import redis

from labctl.shared.artifacts import ArtifactStore, JobFolder, utc_now, write_json
from labctl.shared.jobstate import JobRecord, JobState, Summary, is_terminal
from labctl.shared.records import MAX_WORKER_LOSSES, JobRecords, initial_record, parse_iso
from labctl.shared.spec import JobSpec, build_spec

log = logging.getLogger(__name__)

#: How long a claim keeps trying while Redis is down (a restart takes a few seconds).
CLAIM_RETRY_SECONDS = 60.0

T = TypeVar("T")


# --- the queue's record -----------------------------------------------------------------


def queued(records: JobRecords, job_id: str, spec: JobSpec, queue: str) -> JobRecord:
    """A new job: its record, state queued at attempt 1, written before its message is sent
    so a worker never receives a job it has no record of."""
    return records.create(job_id, spec, queue)


def unsent(records: JobRecords, job_id: str, error: str) -> None:
    """A queued job whose message could not be sent: it can never run, so it failed."""
    records.fail_unclaimed(job_id, error)


class Claim(StrEnum):
    """What became of one message: only ``claimed`` trains."""

    CLAIMED = "claimed"
    MISSING = "missing"    # no record: nothing to run
    TERMINAL = "terminal"  # done, or cancelled while queued
    STALE = "stale"        # an older attempt's message (a redelivery or a duplicate)
    BUSY = "busy"          # a live worker holds this attempt
    ENDED = "ended"        # claimed, but the folder says an earlier attempt ended the job


def claim(records: JobRecords, store: ArtifactStore, job_id: str, attempt: int, owner: str,
          *, lease_seconds: float, worker: str) -> Claim:
    """Try to start ``attempt`` of a queued job as ``owner`` on ``worker``.

    Rides over a Redis restart for up to :data:`CLAIM_RETRY_SECONDS`, then raises
    ``redis.RedisError`` (the caller must not ack a message it could not claim)."""
    folder = store.job(job_id)
    outcome = Claim(_retrying(lambda: records.claim(
        job_id, attempt, owner, lease_seconds, worker=worker,
        artifacts=str(folder.path.resolve()))))
    if outcome is Claim.TERMINAL:  # e.g. cancelled while queued after a hand-back
        _mirror_record_end(records, folder, job_id)
    if outcome is not Claim.CLAIMED:
        return outcome
    # A previous attempt may have ended the job but not told Redis (an outage at the very
    # end), so the reaper requeued it: the folder is the truth; do not train it again.
    if _end_recorded_in_folder(records, folder, job_id, owner):
        return Claim.ENDED
    records.append_log(job_id, f"attempt {attempt} started on {worker}")
    return outcome


class Beat(IntEnum):
    LOST = 0              # another attempt owns the job now
    ALIVE = 1
    CANCEL_REQUESTED = 2  # alive, and the user asked to stop it
    MISSING = 3           # Redis has no record of the job: see restore_record()


def heartbeat(records: JobRecords, job_id: str, owner: str, lease_seconds: float) -> Beat:
    """Renew ``owner``'s lease on a running job."""
    return Beat(records.heartbeat(job_id, owner, lease_seconds))


def restore_record(records: JobRecords, folder: JobFolder, job_id: str, owner: str, *,
                   lease_seconds: float) -> bool:
    """Redis lost the record of a job ``owner`` runs (restarted without persistence, or
    replaced): write it back from the job folder, the durable copy, so the job finishes
    and stays visible. A folder that recorded an end gives an ended record; otherwise the
    record is running, held by ``owner``. False if a record exists again."""
    spec = build_spec(folder.read_spec() or {})
    status = folder.read_status()
    state = status["state"] if is_terminal(status.get("state")) else JobState.RUNNING
    now = utc_now()
    fields = {
        **initial_record(job_id, spec, status.get("queue") or "cpu"),
        "state": state, "attempts": status.get("attempts") or 1,
        "created_at": status.get("started_at") or now,
        "started_at": status.get("started_at") or now, "attempt_started_at": now,
        "heartbeat_at": now, "finished_at": status.get("finished_at"),
        "epoch": status.get("epoch") or 0, "metrics": status.get("metrics"),
        "error": status.get("error"), "worker": status.get("worker"),
        "artifacts": str(folder.path.resolve()), "restored_at": now,
    }
    if is_terminal(state):
        fields["summary"] = record_summary(_read_or_none(folder.read_summary))
    restored = records.restore(
        job_id, owner, lease_seconds, fields, folder.read_log(),
        created=parse_iso(fields["created_at"]) or time.time(),
        logged_epochs=[row["epoch"] for row in folder.read_metrics()])
    if restored:
        log.warning("job %s: Redis had no record of it (restarted without persistence?); "
                    "record restored from the job folder as %s", job_id, state)
    return restored


def progress(records: JobRecords, job_id: str, owner: str, **fields: Any) -> bool:
    """Record a running job's progress (data sizes, the latest epoch and its row) if
    ``owner`` still runs it. A state change is never progress: use :func:`ended`."""
    if "state" in fields:
        raise ValueError("progress() does not change a job's state")
    return records.update_owned(job_id, owner, **fields)


def ended(records: JobRecords, job_id: str, owner: str, state: JobState, *,
          error: str | None = None, summary: Summary | None = None) -> bool:
    """The job ended as ``state``; releases its lease. False if ``owner`` no longer runs it
    (its record then belongs to the attempt that replaced it and is left alone)."""
    if not is_terminal(state):
        raise ValueError(f"{state!r} is not an end")
    return records.update_owned(job_id, owner, state=JobState(state), error=error,
                                finished_at=utc_now(), summary=record_summary(summary))


class Requeue(NamedTuple):
    """A running job's record after a hand-back or a reap: ``outcome`` is requeued (send
    the message for ``attempt``), alive, not-running, not-owner, cancelled or failed."""

    outcome: str
    attempt: int = 0


def hand_back(records: JobRecords, store: ArtifactStore, job_id: str, owner: str,
              loss: str | None = None, max_losses: int = MAX_WORKER_LOSSES) -> Requeue:
    """Our worker gives the job up: it goes back to the queue as the next attempt, or ends
    cancelled if the user asked meanwhile. A shutdown is not a loss; ``loss`` (a process of
    the job was killed: the OOM killer, a GPU fault) is, and the job fails once it has lost
    ``max_losses`` workers or processes, as the reaper decides for lost workers. An end
    decided here is mirrored into the job's folder."""
    result = Requeue(*records.release(job_id, owner, loss, max_losses))
    if result.outcome in ("failed", "cancelled"):
        _mirror_record_end(records, store.job(job_id), job_id)
    return result


def reap(records: JobRecords, store: ArtifactStore, job_id: str,
         max_losses: int = MAX_WORKER_LOSSES) -> Requeue:
    """The reaper's step for one running job: requeue it if its lease expired, or end it
    (failed after ``max_losses`` lost workers; cancelled if the user asked). An end the
    dead worker never wrote into the folder is mirrored there."""
    result = Requeue(*records.requeue_if_dead(job_id, max_losses))
    if result.outcome in ("failed", "cancelled"):
        _mirror_record_end(records, store.job(job_id), job_id)
    return result


def cancel(records: JobRecords, job_id: str, store: ArtifactStore | None = None) -> str:
    """The user's cancel. Returns the state the job was in: ``missing``, ``queued`` (now
    cancelled), ``running`` (flagged; its worker stops it at the next batch), ``lost``
    (running on a worker that is gone: now cancelled) or an end. An end decided here is
    mirrored into the job's folder when ``store`` holds it."""
    found = records.request_cancel(job_id)
    if store is not None and found in ("queued", "lost"):
        _mirror_record_end(records, store.job(job_id), job_id)
    return found


def record_summary(summary: Summary | dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of summary.json the job record keeps (the rest stays in the folder)."""
    summary = summary or {}
    return {k: summary[k] for k in ("final", "best", "total_seconds") if k in summary} or None


# --- the job folder ---------------------------------------------------------------------


def run_started(folder: JobFolder, spec: JobSpec, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """A run (first or resumed) starts writing ``folder``: creates it, writes the spec and
    marks it running. Returns the status as the previous attempt left it. Raises ``OSError``
    (unwritable store) or ``ValueError`` (a corrupt status.json)."""
    folder.create()
    write_json(folder.spec_path, spec.model_dump(mode="json"))
    before = folder.read_status()
    folder.update_status(state=JobState.RUNNING,
                         started_at=before.get("started_at") or utc_now(),
                         finished_at=None, error=None, epochs=spec.epochs,
                         epoch=before.get("epoch", 0), **(extra or {}))
    return before


def run_progress(folder: JobFolder, **fields: Any) -> None:
    """Record a run's progress in status.json (data sizes, the last epoch, run seconds)."""
    if "state" in fields:
        raise ValueError("run_progress() does not change a job's state")
    folder.update_status(**fields)


def run_ended(folder: JobFolder, state: JobState, error: str | None, *,
              run_seconds: float) -> None:
    """The run ended as ``state``: the folder's half of the end (its record's follows)."""
    if not is_terminal(state):
        raise ValueError(f"{state!r} is not an end")
    folder.update_status(state=JobState(state), error=error, finished_at=utc_now(),
                         run_seconds=run_seconds)


# --- reconciling the two stores (the rule in the module docstring) ----------------------


def _end_recorded_in_folder(records: JobRecords, folder: JobFolder, job_id: str,
                            owner: str) -> bool:
    """If the folder says the job ended, copy that end into the record (held by ``owner``)."""
    status = _read_or_none(folder.read_status) or {}
    if not is_terminal(status.get("state")):
        return False
    records.update_owned(job_id, owner, state=status["state"], error=status.get("error"),
                         finished_at=status.get("finished_at") or utc_now(),
                         summary=record_summary(_read_or_none(folder.read_summary)))
    log.warning("job %s had already ended %s; record corrected", job_id, status["state"])
    return True


def _mirror_record_end(records: JobRecords, folder: JobFolder, job_id: str) -> None:
    try:
        record = records.get(job_id) or {}
    except redis.RedisError:
        return  # the folder keeps its state; the record stays the truth
    if mirror_end_into_folder(folder, record):
        log.info("job %s: folder status set to %s, as its record says", job_id, record["state"])


def mirror_end_into_folder(folder: JobFolder, record: JobRecord | dict[str, Any]) -> bool:
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


def _read_or_none(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except (OSError, ValueError):  # unreadable or corrupt: as if it were not there
        return None


def _retrying(call: Callable[[], T], seconds: float | None = None) -> T:
    """Ride over a Redis restart (a few seconds) instead of giving the message up."""
    deadline = time.monotonic() + (CLAIM_RETRY_SECONDS if seconds is None else seconds)
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable (%s); retrying", exc)
            time.sleep(1.0)
