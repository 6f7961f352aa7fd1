"""Crash safety with real processes: a worker SIGKILLed mid-job, and Redis restarted mid-job.

Short heartbeats make the reaper act within seconds instead of the production 30 s.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from labctl.shared.artifacts import ArtifactStore
from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import submit_job
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import RedisServer, WorkerProcess, stop_all, wait_for
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

#: 0.1 to 1 s per epoch depending on the machine's load: enough epochs that the job is
#: still running when the test acts after the first one.
EPOCHS = 16
JOB = {"model": "numpy-cnn", "dataset": "digits", "epochs": EPOCHS, "batch_size": 16,
       "limit_test": 128, "num_workers": 0}


def worker_env(tmp_path: Path, timeout: float) -> dict[str, str]:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"LABCTL_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
            "LABCTL_DATA_DIR": str(tmp_path / "data"),
            "LABCTL_HEARTBEAT_SECONDS": "0.5", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": str(timeout)}


def submit(server: RedisServer, records: JobRecords, **overrides) -> str:
    return submit_job(build_spec({**JOB, **overrides}), records=records,
                      app=make_app(server.url))


def wait_end(records: JobRecords, job_id: str, timeout: float) -> dict:
    wait_for(lambda: records.state(job_id) in TERMINAL_STATES, timeout, interval=0.1,
             what=f"job {job_id} to end")
    return records.get(job_id)


def test_killed_worker_job_resumes_from_its_checkpoint_elsewhere(redis_server, tmp_path):
    env = worker_env(tmp_path, timeout=3)
    records = JobRecords.from_url(redis_server.url)
    first = WorkerProcess(redis_server.url, tmp_path / "w1.log", name="w1", env=env)
    second = WorkerProcess(redis_server.url, tmp_path / "w2.log", name="w2", env=env)
    try:
        first.start().wait_ready()
        job_id = submit(redis_server, records)
        # The record's epoch moves after the epoch's checkpoint is on disk.
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 120, interval=0.02,
                 what="the first epoch checkpoint")
        killed_after = records.get(job_id)["epoch"]
        first.kill()
        assert killed_after < EPOCHS, "the job finished before it could be killed"

        second.start().wait_ready()
        wait_for(lambda: records.get(job_id)["attempts"] == 2
                 and records.get(job_id)["state"] == "running", 60, interval=0.1,
                 what="the job to be picked up again")
        record = wait_end(records, job_id, timeout=120)
    finally:
        stop_all([first, second])

    assert record["state"] == "succeeded", record["error"]
    assert record["attempts"] == 2 and record["worker"] == second.hostname
    folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id)
    assert [row["epoch"] for row in folder.read_metrics()] == list(range(1, EPOCHS + 1))
    log = records.read_log(job_id)
    resumed = [line for line in log if line.startswith("resumed from checkpoint after epoch")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= killed_after
    assert "requeued as attempt 2" in log
    assert folder.read_status()["attempts"] == 2


def test_job_survives_a_redis_restart(tmp_path):
    env = worker_env(tmp_path, timeout=10)
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        records = JobRecords.from_url(server.url)
        with WorkerProcess(server.url, tmp_path / "w1.log", name="w1", env=env) as worker:
            job_id = submit(server, records)
            wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 120, interval=0.02,
                     what="the first epoch")
            server.restart(downtime=1.0)  # same port, data from the append-only file
            record = wait_end(records, job_id, timeout=120)
            assert record["state"] == "succeeded", record["error"]
            assert record["attempts"] == 1
            folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id)
            assert [row["epoch"] for row in folder.read_metrics()] == list(range(1, EPOCHS + 1))
            # The worker's broker connection recovered too: it takes the next job.
            after = submit(server, records, epochs=1)
            assert wait_end(records, after, timeout=60)["state"] == "succeeded"
            assert worker.alive()


def test_a_worker_frozen_through_a_redis_restart_takes_jobs_again(tmp_path):
    """Redis restarts while the worker is stopped (SIGSTOP; a paused container or VM is the
    same): on waking, each of its sockets reads end-of-file from the old server while the new
    one already answers. redis-py's in-place retry of the pubsub read then reconnected and
    blocked for good on the new socket, and the worker never took another job."""
    env = worker_env(tmp_path, timeout=60)
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        records = JobRecords.from_url(server.url)
        with WorkerProcess(server.url, tmp_path / "w1.log", name="w1", env=env) as worker:
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                job_id = submit(server, records, epochs=1)
                server.restart()
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            assert wait_end(records, job_id, timeout=90)["state"] == "succeeded"
            after = submit(server, records, epochs=1)
            assert wait_end(records, after, timeout=60)["state"] == "succeeded"
