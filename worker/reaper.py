"""Crash safety: a heartbeat for the job a worker runs, and a reaper that requeues the jobs
whose worker stopped beating.

Why not kombu's ``visibility_timeout`` alone: it re-delivers an unacked message a fixed time
after delivery, whether the job is alive or not. Jobs here take minutes to hours, so a short
timeout runs healthy jobs twice and a long one leaves a crashed job stuck for hours. A lease
measures liveness instead: the worker renews ``labctl:job:<id>:lease`` every
``heartbeat_seconds``; Redis expires it ``heartbeat_timeout_seconds`` after the last renewal
(Redis' clock only, so clock skew between hosts does not matter). Every worker runs a reaper
thread; a running job without a lease is requeued by one Lua script, so however many reapers
see it, exactly one requeues it and the job's ``attempts`` goes up by exactly one. The new
attempt resumes from the job's last epoch checkpoint. See docs/queue.md.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from labctl.shared import lifecycle
from labctl.shared.artifacts import ArtifactStore, JobFolder
from labctl.shared.lifecycle import Beat
from labctl.shared.records import MAX_WORKER_LOSSES, JobRecords, connect
from labctl.shared.settings import get_settings
from labctl.worker.capacity import worker_capacity

log = logging.getLogger(__name__)

_records: JobRecords | None = None
_records_lock = threading.Lock()


def worker_records() -> JobRecords:
    """The worker process' one records client (its connection pool is thread-safe)."""
    global _records
    with _records_lock:
        if _records is None:
            _records = JobRecords(connect(get_settings().redis_url))
        return _records


def reaper_interval(timeout: float) -> float:
    """Often enough that a dead job waits about ``timeout`` plus a fraction of it."""
    return max(0.2, min(5.0, timeout / 4))


class Heartbeat(threading.Thread):
    """Renews one job's lease until stopped. Training never waits on Redis: the outcome of
    each beat is left in ``lost`` / ``cancel_requested`` for the reporter to act on."""

    def __init__(self, records: JobRecords, job_id: str, owner: str, *,
                 interval: float, lease_seconds: float, folder: JobFolder | None = None):
        super().__init__(name=f"labctl-heartbeat-{job_id}", daemon=True)
        self.records, self.job_id, self.owner = records, job_id, owner
        self.interval, self.lease_seconds = interval, lease_seconds
        #: where a record Redis lost is restored from (None: a lost record is a lost job)
        self.folder = folder
        self.lost = threading.Event()             # another attempt owns the job now
        self.cancel_requested = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        try:
            beat = lifecycle.heartbeat(self.records, self.job_id, self.owner,
                                       self.lease_seconds)
            if (beat is Beat.MISSING and self.folder is not None
                    and not self._stop_event.is_set()):
                if not self.restore_if_missing():
                    return  # the folder could not be read: try again at the next beat
                # Restored, by this thread or a racing one: ours again unless another
                # attempt's record took its place.
                beat = lifecycle.heartbeat(self.records, self.job_id, self.owner,
                                           self.lease_seconds)
        except redis.RedisError as exc:
            # Redis restarting: the lease outlives a short outage; keep trying.
            log.warning("heartbeat for job %s failed: %s", self.job_id, exc)
            return
        if beat in (Beat.LOST, Beat.MISSING):
            if self._stop_event.is_set():
                return  # the job just ended: its final update released the lease
            if not self.lost.is_set():
                log.error("job %s: lease lost (requeued while this worker was unresponsive); "
                          "abandoning this attempt", self.job_id)
            self.lost.set()
        elif beat is Beat.CANCEL_REQUESTED:
            self.cancel_requested.set()

    def restore_if_missing(self) -> bool:
        """Write the job's record back from its folder if Redis has none. True if a record
        exists afterwards (restored here or by a racing thread)."""
        if self.folder is None:
            return False
        try:
            if self.records.state(self.job_id) is None:
                lifecycle.restore_record(self.records, self.folder, self.job_id, self.owner,
                                         lease_seconds=self.lease_seconds)
            return True
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("job %s: its record could not be restored yet: %s", self.job_id, exc)
            return False

    def stop(self) -> None:
        self._stop_event.set()


class Reaper(threading.Thread):
    """Requeues running jobs whose lease expired. One per worker process."""

    def __init__(self, app: Any, records: JobRecords, *, interval: float,
                 max_losses: int = MAX_WORKER_LOSSES, worker: str | None = None,
                 queues: tuple[str, ...] = ()):
        super().__init__(name="labctl-reaper", daemon=True)
        self.app, self.records = app, records
        self.interval, self.max_losses = interval, max_losses
        #: this worker's name and queues, announced each round (``labctl submit --follow``
        #: says when no live worker takes the job's queue)
        self.worker, self.queues = worker, queues
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                if self.worker:
                    self.records.announce_worker(self.worker, self.queues, 3 * self.interval,
                                                 worker_capacity())
                self.sweep()
            except redis.RedisError as exc:
                log.warning("reaper: Redis unavailable (%s); retrying", exc)
            except Exception:  # the reaper must outlive any single bad record
                log.exception("reaper: sweep failed")
            if self._stop_event.wait(self.interval):
                return

    def sweep(self) -> list[str]:
        """One pass over the running jobs; returns the ids it requeued."""
        requeued = []
        store = ArtifactStore(get_settings().artifacts_dir)
        for job_id in self.records.running_ids():
            reaped = lifecycle.reap(self.records, store, job_id, self.max_losses)
            if reaped.outcome == "requeued":
                log.warning("job %s: its worker stopped heartbeating; requeued as attempt %d",
                            job_id, reaped.attempt)
                send_job(self.app, self.records, job_id, reaped.attempt)
                requeued.append(job_id)
            elif reaped.outcome in ("failed", "cancelled"):
                log.warning("job %s: its worker was lost; marked %s", job_id, reaped.outcome)
        return requeued

    def stop(self) -> None:
        self._stop_event.set()


def send_job(app: Any, records: JobRecords, job_id: str, attempt: int) -> None:
    """Send the message for ``attempt`` of a job already marked queued with that attempt.

    If this process died right here, the record would say queued with no message to run it;
    the window is two consecutive Redis calls (see docs/queue.md).
    """
    from labctl.shared.queue import enqueue

    record = records.get(job_id)
    if record is None:
        return
    records.append_log(job_id, f"requeued as attempt {attempt}")
    enqueue(job_id, record["spec"], attempt=attempt, queue=record["queue"], app=app)


_reaper: Reaper | None = None


def start_reaper(app: Any, worker: str | None = None, queues: tuple[str, ...] = ()) -> Reaper:
    """Start this process' reaper thread (idempotent); it also announces ``worker``."""
    global _reaper
    if _reaper is None or not _reaper.is_alive():
        settings = get_settings()
        _reaper = Reaper(app, worker_records(),
                         interval=reaper_interval(settings.heartbeat_timeout_seconds),
                         worker=worker, queues=queues)
        _reaper.start()
        log.info("reaper started: requeues jobs silent for %.1fs",
                 settings.heartbeat_timeout_seconds)
    return _reaper
