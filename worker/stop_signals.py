"""SIGINT and SIGQUIT on a worker: hand the job back like SIGTERM, and exit at once if asked again.

Celery makes the second Ctrl-C and every SIGQUIT a cold shutdown, which kills the running
task through the pool. Neither of our pools can: the solo pool raised inside the training
loop and failed the user's job ("does not implement kill_job"), the threads pool raised in
the consumer and then waited for the job to end, hours later. So every stop signal starts
the warm shutdown SIGTERM does (``worker_shutting_down``: the job stops at its next batch
and is requeued), and a stop signal during a shutdown exits the process at once: the job
is then recovered as a killed worker's is (its lease expires, a reaper requeues it, it
resumes from its last epoch checkpoint). SIGTERM keeps Celery's own handler.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from celery import platforms, signals
from celery.apps.worker import safe_say
from celery.worker import state

#: Celery's exit code for a shutdown by SIGINT or SIGQUIT.
EXIT_INTERRUPTED = 1


def install_stop_signals(hostname: str) -> None:
    """Replace Celery's SIGINT and SIGQUIT handlers, once Celery has installed its own (at
    ``worker_ready``). A worker embedded in another thread (Celery's test worker) installs
    none, and neither does Celery."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGINT", "SIGQUIT"):
        platforms.signals[name] = _stop_handler(name, hostname)


def _stop_handler(name: str, hostname: str) -> Any:
    def stop(*_args: object) -> None:
        if shutting_down():
            safe_say(f"worker: {name} during shutdown: exiting now; the running job, if any, "
                     "is requeued when its lease expires", sys.__stdout__)
            os._exit(EXIT_INTERRUPTED)
        safe_say(f"worker: Warm shutdown ({name}); send it again to exit at once",
                 sys.__stdout__)
        try:
            signals.worker_shutting_down.send(sender=hostname, sig=name, how="Warm",
                                              exitcode=EXIT_INTERRUPTED)
        finally:
            state.should_stop = EXIT_INTERRUPTED  # what stops the consumer

    return stop


def shutting_down() -> bool:
    """Whether a stop signal (ours or Celery's SIGTERM) has already been received."""
    return any(flag not in (None, False) for flag in (state.should_stop, state.should_terminate))
