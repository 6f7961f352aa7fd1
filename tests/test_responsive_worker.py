"""A worker answers Celery's remote control and Flower while it trains (issue 16).

A real password-protected redis-server, one real ``labctl worker``, Celery's own ``inspect``
command and a real Flower, all shared by this module: one long job trains while the tests
ask. A worker whose training blocks its consumer (the solo pool) fails the inspect and
Flower tests: no pong, no active task, and Flower sees its heartbeats stop. The job's
metrics still come from the worker process itself.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labctl.shared.celery_config import TASK_NAME, priority_list
from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import submit_job
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import RedisServer, WorkerProcess, free_port, wait_for
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

PASSWORD = "responsive-test-secret-2718"
FLOWER_AUTH = "monitor:flower-test-secret"
#: Hundreds of epochs: it trains for as long as the module runs, and is cancelled at the end.
LONG = {"model": "numpy-cnn", "dataset": "digits", "epochs": 500, "batch_size": 16,
        "limit_test": 128, "num_workers": 0}
#: Celery workers send a heartbeat event every 2 s and Flower counts one silent for 4 s
#: (plus drift) as offline: after this long in a job, a worker that cannot beat while it
#: trains is offline in Flower.
BUSY_SECONDS = 10.0


@dataclass
class Busy:
    redis: RedisServer
    worker: WorkerProcess
    records: JobRecords
    flower_port: int
    metrics_port: int
    job_id: str
    #: submitted after job_id, to the same single worker: it must wait its turn
    queued_id: str

    def celery(self, *args: str) -> subprocess.CompletedProcess:
        """``celery -A labctl.worker.app ARGS`` in a subprocess, as an operator runs it."""
        env = {**os.environ, "LABCTL_REDIS_URL": self.redis.url}
        return subprocess.run([sys.executable, "-m", "celery", "-A", "labctl.worker.app", *args],
                              env=env, cwd=self.worker.log_path.parent, capture_output=True,
                              text=True, timeout=60)

    def flower(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.flower_port}{path}", method=method,
            data=b"" if method == "POST" else None,
            headers={"Authorization": "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode()})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def assert_still_training(self) -> None:
        record = self.records.get(self.job_id)
        assert record["state"] == "running" and record["worker"] == self.worker.hostname, record
        assert self.worker.alive(), self.worker.log_text()[-3000:]


def start_flower(redis_url: str, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "LABCTL_REDIS_URL": redis_url}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "labctl.worker.app", "flower",
             f"--port={port}", "--address=127.0.0.1", f"--basic-auth={FLOWER_AUTH}"],
            cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


def flower_up(port: int, process: subprocess.Popen, log_path: Path) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"flower exited:\n{log_path.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def busy(tmp_path_factory) -> Iterator[Busy]:
    pytest.importorskip("flower", reason="Flower is a dev dependency: pip install -e '.[dev]'")
    tmp = tmp_path_factory.mktemp("responsive")
    (tmp / "data").mkdir()
    env = {"LABCTL_ARTIFACTS_DIR": str(tmp / "artifacts"), "LABCTL_DATA_DIR": str(tmp / "data"),
           "LABCTL_HEARTBEAT_SECONDS": "0.5", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "5"}
    with RedisServer(tmp / "redis", password=PASSWORD) as server:
        # Flower first: it learns of a task only from the events sent while it listens.
        flower_port, flower_log = free_port(), tmp / "flower.log"
        flower = start_flower(server.url, flower_port, flower_log)
        metrics_port = free_port()
        worker = WorkerProcess(server.url, tmp / "worker.log", name="busy", queues="cpu",
                               env=env, extra_args=["--metrics-port", str(metrics_port)])
        try:
            wait_for(lambda: flower_up(flower_port, flower, flower_log), 90, interval=0.2,
                     what="flower to serve")
            worker.start().wait_ready()
            records = JobRecords.from_url(server.url)
            app = make_app(server.url)
            job_id = submit_job(build_spec(LONG), records=records, app=app)
            wait_for(lambda: records.state(job_id) == "running", 60, what="the job to start")
            queued_id = submit_job(build_spec({**LONG, "seed": 1}), records=records, app=app)
            time.sleep(BUSY_SECONDS)
            yield Busy(server, worker, records, flower_port, metrics_port, job_id, queued_id)
        finally:
            worker.stop()
            flower.terminate()
            try:
                flower.wait(15)
            except subprocess.TimeoutExpired:
                flower.kill()
                flower.wait()


def test_inspect_ping_gets_a_pong_while_the_job_trains(busy):
    busy.assert_still_training()
    # -t 5: a worker that has not answered within 5 s is reported as no reply at all.
    done = busy.celery("inspect", "ping", "-t", "5", "-d", busy.worker.hostname)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{busy.worker.hostname}: OK" in done.stdout and "pong" in done.stdout
    busy.assert_still_training()


def test_inspect_active_lists_the_job_running_in_the_worker_process(busy):
    done = busy.celery("inspect", "active", "-t", "5", "-d", busy.worker.hostname, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    active = json.loads(done.stdout)[busy.worker.hostname]
    assert [(task["name"], task["args"][0]) for task in active] == [(TASK_NAME, busy.job_id)]
    # In the worker process itself, not a pool child: a SIGKILL of the worker takes the job
    # with it, and its /metrics are the job's.
    assert active[0]["worker_pid"] == busy.worker.pid
    busy.assert_still_training()


def test_one_job_at_a_time_the_next_waits_in_the_queue(busy):
    busy.assert_still_training()
    assert busy.records.state(busy.queued_id) == "queued"
    # Its message is still on the list, not prefetched and held behind the running job.
    assert busy.redis.client().llen(priority_list("cpu")) == 1
    done = busy.celery("inspect", "reserved", "-t", "5", "-d", busy.worker.hostname, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {busy.worker.hostname: []}  # none waits in the worker


def test_the_worker_process_serves_the_metrics_of_the_job_its_thread_trains(busy):
    with urllib.request.urlopen(f"http://127.0.0.1:{busy.metrics_port}/metrics",
                                timeout=10) as response:
        text = response.read().decode()
    samples = [sample for family in text_string_to_metric_families(text)
               for sample in family.samples]
    assert [s.value for s in samples if s.name == "labctl_jobs_running"] == [1]
    assert [s.value for s in samples if s.name == "labctl_job_epochs"
            and s.labels.get("job_id") == busy.job_id] == [LONG["epochs"]]
    busy.assert_still_training()


def test_flower_shows_the_busy_worker_online_and_its_task_started(busy):
    busy.assert_still_training()
    # Waits out one late heartbeat on a loaded machine; a worker that cannot beat while it
    # trains stays offline however long this waits.
    wait_for(lambda: busy.flower("/api/workers?status=1") == {busy.worker.hostname: True}, 15,
             interval=0.5, what="flower to see the worker online")
    tasks = busy.flower("/api/tasks")
    running = [task for task in tasks.values() if busy.job_id in task["args"]]
    assert [(task["state"], task["worker"]) for task in running] == \
        [("STARTED", busy.worker.hostname)]
    # Flower asks the worker itself for its details (remote control): it answers too.
    workers = busy.flower("/api/workers?refresh=1")
    assert workers[busy.worker.hostname]["stats"]["pool"]["max-concurrency"] == 1
    assert PASSWORD not in json.dumps(workers)
    busy.assert_still_training()


def test_flowers_terminate_cancels_the_job_and_the_worker_takes_the_next(busy):
    """Last in the module: it ends the job the others watch. Flower's Terminate button (a
    revoke with terminate) cannot kill a thread; the worker's pool makes it labctl's cancel,
    and the worker lives on."""
    (task_id,) = [task_id for task_id, task in busy.flower("/api/tasks").items()
                  if busy.job_id in task["args"] and task["state"] == "STARTED"]
    busy.flower(f"/api/task/revoke/{task_id}?terminate=true", method="POST")
    wait_for(lambda: busy.records.state(busy.job_id) in TERMINAL_STATES, 60, interval=0.1,
             what="the terminated job to end")
    record = busy.records.get(busy.job_id)
    assert record["state"] == "cancelled" and record["error"] == "cancelled by the user"
    assert busy.worker.alive()
    wait_for(lambda: busy.records.state(busy.queued_id) == "running", 60,
             what="the queued job to start")
    assert busy.records.get(busy.queued_id)["worker"] == busy.worker.hostname
    log = busy.worker.log_text()
    assert f"job {busy.job_id}: terminate (SIGTERM) asked through Celery" in log
    assert "does not implement kill_job" not in log
