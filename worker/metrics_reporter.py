"""Export a job's progress as Prometheus metrics (see :mod:`shared.metrics`).

The Celery task adds one ``MetricsReporter`` per job to the runner's reporters. The worker
process serves the values on ``/metrics``; nothing here does I/O, so a reporter call costs
microseconds and can never fail a job.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from labctl.shared.jobstate import EpochRow, JobState
from labctl.shared.spec import JobSpec
from labctl.worker import metrics as m
from labctl.worker.runner import Reporter

# metrics.jsonl column -> running-job gauge.
ROW_GAUGES = {
    "train_loss": m.TRAIN_LOSS,
    "test_loss": m.TEST_LOSS,
    "test_accuracy": m.TEST_ACCURACY,
    "test_f1_macro": m.TEST_F1,
    "images_per_second": m.IMAGES_PER_SECOND,
    "lr": m.LEARNING_RATE,
}


class _JobSeries:
    """What must be undone when a job leaves this worker: its series and its running count.

    Kept apart from the reporter so a ``weakref.finalize`` can call :meth:`release` without
    holding the reporter alive."""

    def __init__(self, job_labels: tuple[str, ...]):
        self.job_labels = job_labels
        self.running = False
        self.released = False
        self._lock = threading.Lock()  # the finalizer may run on another thread

    def start(self) -> None:
        with self._lock:
            if not self.running and not self.released:
                m.JOBS_RUNNING.inc()
                self.running = True

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
            if self.running:
                m.JOBS_RUNNING.dec()
                self.running = False
            m.remove_job_series(self.job_labels)


class MetricsReporter(Reporter):
    """Sets the running-job gauges each epoch, observes the histograms, counts the final
    state and removes the job's series at the end.

    A job can also leave the worker without ``on_end``: the queue hands it back (worker
    shutdown, lost lease) by raising through the runner. The task should then call
    :meth:`close`; as a safety net the series are also released when the reporter is garbage
    collected, so a forgotten job never stays "running" on a dashboard.
    """

    def __init__(self, spec: JobSpec, job_id: str, *,
                 clock: Callable[[], float] = time.monotonic):
        self.spec_labels = (spec.model, spec.optimizer, spec.dataset)
        self.job_labels = (job_id, *self.spec_labels)
        self.epochs = spec.epochs
        self._clock = clock
        # The job's duration includes loading data and building the model, which happen
        # before on_start; the task builds this reporter just before it runs the job.
        self._created = clock()
        self._ended = False
        self._series = _JobSeries(self.job_labels)
        weakref.finalize(self, self._series.release)
        m.init_spec_series(self.spec_labels)

    def _gauge(self, gauge):
        return gauge.labels(*self.job_labels)

    def on_start(self, job_id: str, spec: JobSpec, info: dict[str, Any]) -> None:
        if self._series.released:  # a late hook must not bring back removed series
            return
        self._series.start()
        self._gauge(m.EPOCHS).set(spec.epochs)
        self._gauge(m.DEVICES).set(spec.devices)
        self._gauge(m.EPOCH).set(info.get("start_epoch", 0))  # a resumed job starts at k
        self._gauge(m.EPOCH_PROGRESS).set(0)

    def on_batch(self, epoch: int, batch: int, num_batches: int) -> None:
        if self._series.released:
            return
        self._gauge(m.EPOCH_PROGRESS).set(batch / max(num_batches, 1))

    def on_epoch(self, row: EpochRow) -> None:
        if self._series.released:
            return
        for column, gauge in ROW_GAUGES.items():
            value = row.get(column)
            if value is not None:
                self._gauge(gauge).set(value)
        self._gauge(m.EPOCH).set(row["epoch"])
        # The finished epoch is counted in EPOCH; progress is the next one's, none yet.
        self._gauge(m.EPOCH_PROGRESS).set(0)
        seconds = row.get("epoch_seconds")
        if seconds is not None and math.isfinite(seconds):
            m.EPOCH_DURATION.labels(*self.spec_labels).observe(seconds)

    def on_end(self, state: JobState, result: dict[str, Any]) -> None:
        if self._ended or self._series.released:  # once, even if a task calls it again
            return
        self._ended = True
        m.JOBS.labels(state, *self.spec_labels).inc()
        m.JOB_DURATION.labels(state, *self.spec_labels).observe(self._clock() - self._created)
        self._series.release()

    def close(self) -> None:
        """The job left this worker without ending (handed back to the queue): drop its
        series and running count, count no final state. Idempotent; a no-op after on_end."""
        self._series.release()
