"""SIGQUIT (Celery's cold shutdown, and what a second Ctrl-C becomes) on a busy worker hands
the job back, as SIGTERM does, on both pools a worker may run.

Celery's cold shutdown kills the running task through the pool, which neither pool can:
the solo pool failed the user's job ("does not implement kill_job"), the threads pool
logged an unrecoverable error and waited for the job to end. Real redis-server and worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from labctl.shared.queue import submit_job
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import wait_for
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

LONG = {"model": "numpy-cnn", "dataset": "digits", "epochs": 500, "batch_size": 16,
        "limit_test": 128, "num_workers": 0}
WORKERS = {
    "labctl worker": ["-m", "labctl.cli.main", "worker", "--queues", "cpu",
                      "--hostname", "quit@%h"],
    "celery worker --pool solo": ["-m", "celery", "-A", "labctl.worker.app", "worker", "-Q", "cpu",
                                  "--pool", "solo", "-n", "quit@%h", "--loglevel", "info"],
}


@pytest.mark.parametrize("kind", list(WORKERS))
def test_sigquit_hands_the_running_job_back_and_exits(kind, redis_server, tmp_path):
    (tmp_path / "data").mkdir()
    env = {**os.environ, "LABCTL_REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1",
           "LABCTL_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "LABCTL_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "LABCTL_HEARTBEAT_SECONDS": "0.5", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "30"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, *WORKERS[kind]], cwd=tmp_path, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: " ready." in log.read_text(), 90, interval=0.2, what="the worker")
        records = JobRecords.from_url(redis_server.url)
        job_id = submit_job(build_spec(LONG), records=records, app=make_app(redis_server.url))
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 120, interval=0.05,
                 what="the first epoch")
        worker.send_signal(signal.SIGQUIT)
        # Well before the 30 s lease could expire: the hand-back, not the reaper.
        worker.wait(25)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)  # the group we started, and only it
        worker.wait()
    record = records.get(job_id)
    assert (record["state"], record["attempts"], record["error"]) == ("queued", 2, None)
    assert "handed back (worker shutting down (SIGQUIT))" in log.read_text()
    assert "Unrecoverable error" not in log.read_text()
