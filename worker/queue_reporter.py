"""The runner's Reporter for queued jobs: mirrors progress into the job's Redis record,
pushes epoch lines for ``labctl logs``, and stops the job between two batches when the user
cancels it or the job must be handed back.

Redis trouble never fails a job: a write that cannot reach Redis is retried for a while and
then dropped (the artefact folder still has everything); log lines are buffered until Redis
answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from labctl.shared import lifecycle
from labctl.shared.artifacts import utc_now
from labctl.shared.jobstate import EpochRow, JobState
from labctl.shared.records import JobRecords
from labctl.shared.spec import JobSpec
from labctl.worker.engine import JobCancelled
from labctl.worker.reaper import Heartbeat
from labctl.worker.runner import (
    Reporter,
    ReporterWrapper,
    epoch_line,
    outcome_line,
    resume_line,
)

log = logging.getLogger(__name__)

#: Don't ask Redis more often than this from the training loop; NumPy batches take ~1 ms.
CANCEL_POLL_SECONDS = 0.2
#: How long the final record update keeps retrying while Redis is down.
FINAL_WRITE_SECONDS = 30.0


class JobReleased(BaseException):  # noqa: N818 - a control-flow signal, like SystemExit
    """This worker gives the job up without finishing it: the lease was lost, or the worker
    is shutting down. A ``BaseException`` so the runner does not mark the job failed or
    cancelled: the artefact folder is left as it is, for the next attempt to resume."""

    def __init__(self, reason: str, *, lost: bool, counts_as_loss: bool = False):
        super().__init__(reason)
        # lost: this worker no longer owns the job (someone else decides its fate).
        # counts_as_loss: it still does, but a process of the job died (a killed rank).
        self.reason, self.lost, self.counts_as_loss = reason, lost, counts_as_loss


_handback = threading.Event()
_handback_reason = ["worker shutting down"]


def request_handback(reason: str) -> None:
    """Ask the running job (if any) to stop at its next batch and go back to the queue.
    Safe from a signal handler: it only sets a flag."""
    _handback_reason[0] = reason
    _handback.set()


def shutting_down() -> bool:
    """Whether this worker was asked to stop (then it claims no new job)."""
    return _handback.is_set()


class QueueReporter(Reporter):
    def __init__(self, records: JobRecords, job_id: str, owner: str, heartbeat: Heartbeat,
                 *, clock: Callable[[], float] = time.monotonic):
        self.records, self.job_id, self.owner = records, job_id, owner
        self.heartbeat = heartbeat
        self.epochs = 0
        self._clock = clock
        self._last_poll = clock()
        #: (line, the epoch it reports or None), not yet in Redis.
        self._pending_lines: list[tuple[str, int | None]] = []

    # --- Reporter hooks ------------------------------------------------------------------

    def on_start(self, job_id: str, spec: JobSpec, info: dict[str, Any]) -> None:
        self.epochs = spec.epochs
        if info.get("start_epoch"):
            self._backfill_epoch_lines(info.get("finished_rows") or [])
        if info.get("start_epoch") or info.get("resumed"):
            self._log(resume_line(info.get("start_epoch") or 0))
        self._update(num_classes=info.get("num_classes"), train_size=info.get("train_size"),
                     test_size=info.get("test_size"), start_epoch=info.get("start_epoch", 0))

    def on_batch(self, epoch: int, batch: int, num_batches: int) -> None:
        if _handback.is_set():
            raise JobReleased(_handback_reason[0], lost=False)
        if self.heartbeat.lost.is_set():
            raise JobReleased("lease lost to another attempt", lost=True)
        if self.heartbeat.cancel_requested.is_set():
            raise JobCancelled()
        now = self._clock()
        if now - self._last_poll < CANCEL_POLL_SECONDS:
            return
        self._last_poll = now
        try:
            if self.records.cancel_requested(self.job_id):
                raise JobCancelled()
        except redis.RedisError:
            pass  # the heartbeat thread reports outages; training goes on meanwhile

    def before_save(self, epoch: int) -> None:
        # A worker frozen past its lease (SIGSTOP, swap storm) wakes mid-epoch; the
        # heartbeat thread may not have noticed yet. One synchronous beat renews the lease
        # or learns it is gone, so the stale attempt never writes over the folder.
        self.heartbeat.beat()
        if self.heartbeat.lost.is_set():
            raise JobReleased("lease lost to another attempt", lost=True)

    def on_epoch(self, row: EpochRow) -> None:
        self._log(epoch_line(row, self.epochs), epoch=row["epoch"])
        self._update(epoch=row["epoch"], metrics=row, updated_at=utc_now())

    def on_end(self, state: JobState, result: dict[str, Any]) -> None:
        self.heartbeat.stop()  # before the final write, which ends the lease
        error = result.get("error")
        self._log(outcome_line(state, error, result.get("summary")))
        deadline = self._clock() + FINAL_WRITE_SECONDS
        while True:
            try:
                self._flush_lines()
                if lifecycle.ended(self.records, self.job_id, self.owner, state,
                                   error=error, summary=result.get("summary")):
                    return
                # Not ours: another attempt holds it, or Redis lost the record, which is
                # then written back from the folder, where the run has just recorded its end.
                missing = self.records.state(self.job_id) is None
                if not (missing and self.heartbeat.restore_if_missing()):
                    log.warning("job %s ended %s but is no longer ours; record left alone",
                                self.job_id, state)
                return
            except redis.RedisError as exc:
                if self._clock() > deadline:
                    # The reaper will requeue it; the next attempt finds the final
                    # checkpoint and only rewrites the final artefacts.
                    log.error("job %s ended %s but Redis is unreachable: %s",
                              self.job_id, state, exc)
                    return
                time.sleep(1.0)

    # --- helpers -------------------------------------------------------------------------

    def _backfill_epoch_lines(self, rows: list[EpochRow]) -> None:
        """A worker killed between an epoch's checkpoint and its log line (or whose buffered
        line died with it in a Redis outage) left that epoch out of `labctl logs`; the
        resumed attempt will not re-run it, so it writes the line from metrics.jsonl."""
        try:
            logged = self.records.logged_epochs(self.job_id)
        except redis.RedisError:
            return  # a log with a gap beats a job held up by its log
        for row in rows:
            if row["epoch"] not in logged:
                self._pending_lines.append((epoch_line(row, self.epochs), row["epoch"]))

    def _log(self, line: str, *, epoch: int | None = None) -> None:
        self._pending_lines.append((line, epoch))
        try:
            self._flush_lines()
        except redis.RedisError as exc:
            log.warning("job %s: log line kept for later, Redis unavailable: %s",
                        self.job_id, exc)

    def _flush_lines(self) -> None:
        if self._pending_lines:
            self.records.append_log(
                self.job_id, *(line for line, _ in self._pending_lines),
                epochs=[epoch for _, epoch in self._pending_lines if epoch is not None])
            self._pending_lines.clear()

    def _update(self, **fields: Any) -> None:
        try:
            self._flush_lines()
            lifecycle.progress(self.records, self.job_id, self.owner, **fields)
        except redis.RedisError as exc:
            log.warning("job %s: progress not recorded, Redis unavailable: %s",
                        self.job_id, exc)


class GuardedReporter(ReporterWrapper):
    """Wraps a reporter we do not own (metrics): its bugs are logged, never fail a job."""

    def __init__(self, inner: Reporter):
        self.inner = inner

    def _dispatch(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.inner, hook)(*args)
        except Exception:
            log.exception("%s.%s failed", type(self.inner).__name__, hook)
