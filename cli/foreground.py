"""Running a job in this process, on a terminal: progress on stderr and a Ctrl-C that
always stops the job cleanly. Used by ``labctl run`` and ``labctl sweep --local``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

import click

from labctl.shared.artifacts import ArtifactStore
from labctl.shared.spec import JobSpec
from labctl.worker.runner import Reporter, RunOutcome, epoch_line, run_job


class CtrlC:
    """SIGINT (or SIGTERM) while training: the first is a request the reporter acts on at the
    next batch (or after the epoch being evaluated); a second interrupts at once. Outside the
    epoch loop (loading data, writing the final artefacts) the first interrupts at once.

    Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, and where
    that is inside a finaliser (``__del__``, a weakref callback) it is printed as "Exception
    ignored" and lost: the job trained on and exited 0 after a Ctrl-C. A flag is never lost.
    """

    def __init__(self) -> None:
        self.requested = False
        self.training = False  # before the first batch (loading data) there is no loop to stop
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM too (`timeout`, a closed terminal's kill): otherwise the job dies
            # without a word and its status.json says "running" forever.
            self._previous = {signum: signal.signal(signum, self._on_signal)
                              for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in (self._previous or {}).items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.requested or not self.training:
            raise KeyboardInterrupt
        self.requested = True  # no printing here: stderr may be mid-write (reentrant I/O)

    def stop_if_requested(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


class TerminalReporter(Reporter):
    """A progress bar and one line per epoch, on stderr so stdout stays data."""

    def __init__(self, epochs: int, ctrl_c: CtrlC | None = None):
        self.epochs = epochs
        self.ctrl_c = ctrl_c or CtrlC()
        self.interactive = sys.stderr.isatty()
        self._last_draw = 0.0

    def on_start(self, job_id, spec, info):
        resumed = ""
        if info["start_epoch"]:
            resumed = f", resuming after epoch {info['start_epoch']}"
        elif info.get("resumed"):
            resumed = ", no checkpoint to resume from: starting from epoch 1"
        click.echo(f"job {job_id}: {spec.model} / {spec.optimizer} on {spec.dataset} "
                   f"({info['train_size']} train, {info['test_size']} {spec.evaluation_split}, "
                   f"{info['num_classes']} classes){resumed}", err=True)
        self.ctrl_c.training = True

    def on_batch(self, epoch, batch, num_batches):
        self.ctrl_c.stop_if_requested()
        now = time.monotonic()
        if not self.interactive or (now - self._last_draw < 0.1 and batch != num_batches):
            return
        self._last_draw = now
        width = 30
        filled = width * batch // num_batches
        sys.stderr.write(f"\repoch {epoch}/{self.epochs} [{'#' * filled}{'.' * (width - filled)}]"
                         f" {batch}/{num_batches}")
        sys.stderr.flush()

    def on_epoch(self, row):
        if self.interactive:
            sys.stderr.write("\r\033[K")
        click.echo(epoch_line(row, self.epochs), err=True)
        self.ctrl_c.stop_if_requested()  # pressed while the epoch was being evaluated
        if row["epoch"] == self.epochs:
            self.ctrl_c.training = False  # final artefacts next: no batch left to stop at

    def on_end(self, state, result):
        self.ctrl_c.training = False  # writing the outcome: a press now interrupts at once


def quiet_crash_tracebacks() -> None:
    """A crashed job ends in one line on the terminal (the outcome); its traceback stays in
    the job folder's traceback.txt. Workers keep logging tracebacks through Celery's
    handlers."""
    logging.getLogger("labctl.worker.runner").setLevel(logging.CRITICAL)


def run_in_foreground(spec: JobSpec, job_id: str, store: ArtifactStore) -> RunOutcome:
    """``run_job`` with terminal progress; Ctrl-C raises ``KeyboardInterruptWithOutcome``
    once the job folder says cancelled and its last checkpoint is kept."""
    quiet_crash_tracebacks()
    with CtrlC() as ctrl_c:
        return run_job(spec, job_id, store, TerminalReporter(spec.epochs, ctrl_c))
