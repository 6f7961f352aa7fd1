"""The worker's pool: Celery's threads pool, where terminating a task cancels its job.

``celery control revoke --terminate`` and Flower's "Terminate" button end a running task by
asking the pool to kill the process that runs it; Celery's threads pool cannot (its
``terminate_job`` raises), and killing the process would take the worker with it. Here it
is labctl's own cancel instead: the job stops at its next batch and ends ``cancelled``,
its checkpoint kept, exactly as ``labctl cancel`` ends it.

``shared/celery_config.py`` names this class as the pool, so ``labctl worker`` and a plain
``celery -A labctl.worker.app worker`` both run on it.
"""

from __future__ import annotations

import logging
import signal as signals

from celery.concurrency.thread import TaskPool as ThreadsTaskPool

log = logging.getLogger(__name__)


class TaskPool(ThreadsTaskPool):
    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        # One job per process (concurrency 1): the job to stop is the one running here.
        from labctl.worker.tasks import cancel_running_job

        how = signals.Signals(signal).name if signal else "terminate"
        job_id = cancel_running_job()
        if job_id is None:
            log.info("terminate (%s) asked, but no job is running here", how)
        else:
            log.info("job %s: terminate (%s) asked through Celery: cancelling it", job_id, how)
