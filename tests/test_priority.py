"""Priorities through Celery's Redis priority support: a real redis-server and worker."""

from __future__ import annotations

import pytest

from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import submit_job
from labctl.shared.records import JobRecords, parse_iso
from labctl.shared.spec import build_spec
from labctl.shared.testing import WorkerProcess, stop_all, wait_for
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

JOB = {"model": "numpy-cnn", "dataset": "digits", "epochs": 1, "limit_train": 64,
       "limit_test": 32, "num_workers": 0}


def test_a_high_priority_job_submitted_last_starts_first(redis_server, tmp_path):
    records = JobRecords.from_url(redis_server.url)
    app = make_app(redis_server.url)
    normal = [submit_job(build_spec({**JOB, "seed": i}), records=records, app=app)
              for i in range(3)]
    low = submit_job(build_spec({**JOB, "priority": "low"}), records=records, app=app)
    urgent = submit_job(build_spec({**JOB, "priority": "high"}), records=records, app=app)
    assert records.get(urgent)["priority"] == "high"

    worker = WorkerProcess(redis_server.url, tmp_path / "w1.log", name="w1",
                           env={"LABCTL_ARTIFACTS_DIR": str(tmp_path / "artifacts")})
    try:
        worker.start().wait_ready()
        jobs = [urgent, *normal, low]
        wait_for(lambda: all(records.state(j) in TERMINAL_STATES for j in jobs), 180,
                 interval=0.2, what="every job to finish")
    finally:
        stop_all([worker])
    started = {j: parse_iso(records.get(j)["started_at"]) for j in jobs}
    assert sorted(jobs, key=started.get) == [urgent, *normal, low]
    assert all(records.state(j) == "succeeded" for j in jobs)
