"""The queue end to end: a real redis-server (password-protected) and two real worker
processes, shared by every test in this module to keep the suite fast. Jobs are tiny
numpy-cnn runs on the bundled digits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.shared.artifacts import ArtifactStore, JobFolder, new_job_id, write_json
from labctl.shared.celery_config import priority_list
from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import enqueue, submit_job
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import RedisServer, WorkerProcess, stop_all, wait_for
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

PASSWORD = "queue-test-secret-3141"
TINY = {"model": "numpy-cnn", "dataset": "digits", "epochs": 2, "batch_size": 64,
        "limit_train": 256, "limit_test": 128, "num_workers": 0}
#: Long enough to be cancelled while it runs (it never finishes in these tests).
LONG = {**TINY, "epochs": 200, "limit_train": None, "batch_size": 16}
#: lr 10 alone does not diverge (Adam's steps are bounded by lr); with beta2 = 0 a batch
#: whose gradient vanishes divides the momentum by eps, and the loss overflows.
DIVERGE = {"optimizer": "adam", "lr": 10, "betas": [0.9, 0.0], "epochs": 3}


@dataclass
class Stack:
    redis: RedisServer
    workers: list[WorkerProcess]
    records: JobRecords
    app: Any
    artifacts: Path
    data: Path

    def submit(self, **overrides: Any) -> str:
        spec = build_spec({**TINY, **overrides})
        return submit_job(spec, records=self.records, app=self.app)

    def record(self, job_id: str) -> dict[str, Any]:
        return self.records.get(job_id)

    def wait_end(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        wait_for(lambda: self.records.state(job_id) in TERMINAL_STATES, timeout,
                 what=f"job {job_id} to end", interval=0.1)
        return self.record(job_id)

    def wait_state(self, job_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        wait_for(lambda: self.records.state(job_id) == state, timeout,
                 what=f"job {job_id} to be {state}", interval=0.05)
        return self.record(job_id)

    def folder(self, job_id: str) -> JobFolder:
        return ArtifactStore(self.artifacts).job(job_id)

    def worker_logs(self) -> str:
        return "\n".join(w.log_text() for w in self.workers)

    def assert_workers_alive(self) -> None:
        for worker in self.workers:
            assert worker.alive(), worker.log_text()[-3000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("queue")
    artifacts, data = tmp / "artifacts", tmp / "data"
    data.mkdir()
    env = {"LABCTL_ARTIFACTS_DIR": str(artifacts), "LABCTL_DATA_DIR": str(data),
           # A lease well under the 30 s default, yet long enough that a worker starved of
           # the GIL for seconds (its first torch import on a loaded machine) keeps its job:
           # these tests count attempts, and none waits for a lease to expire.
           "LABCTL_HEARTBEAT_SECONDS": "0.5", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "15"}
    with RedisServer(tmp / "redis", password=PASSWORD) as server:
        workers = [WorkerProcess(server.url, tmp / f"{name}.log", name=name, queues="cpu",
                                 env=env) for name in ("w1", "w2")]
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.wait_ready()
            yield Stack(server, workers, JobRecords.from_url(server.url),
                        make_app(server.url), artifacts, data)
        finally:
            stop_all(workers)


def test_twenty_jobs_on_two_workers_all_succeed_once_each(stack):
    job_ids = [stack.submit(seed=n) for n in range(20)]
    ended = [stack.wait_end(job_id, timeout=240) for job_id in job_ids]
    assert [r["state"] for r in ended] == ["succeeded"] * 20, [r["error"] for r in ended]
    logs = stack.worker_logs()
    for record in ended:
        assert record["attempts"] == 1
        assert logs.count(f"job {record['id']} attempt 1 claimed") == 1
        epochs = [row["epoch"] for row in stack.folder(record["id"]).read_metrics()]
        assert epochs == [1, 2]
        status = stack.folder(record["id"]).read_status()
        assert status["state"] == "succeeded" and status["worker"] == record["worker"]
        assert record["metrics"]["epoch"] == 2 and record["summary"]["final"]
    assert {r["worker"] for r in ended} == {w.hostname for w in stack.workers}


def test_a_duplicated_message_runs_the_job_once(stack):
    job_id = stack.submit()
    enqueue(job_id, stack.record(job_id)["spec"], attempt=1, queue="cpu", app=stack.app)
    assert stack.wait_end(job_id)["state"] == "succeeded"
    wait_for(lambda: f"job {job_id} attempt 1 not run" in stack.worker_logs(), 30,
             what="the duplicate to be dropped")
    assert stack.worker_logs().count(f"job {job_id} attempt 1 claimed") == 1
    assert [row["epoch"] for row in stack.folder(job_id).read_metrics()] == [1, 2]
    assert stack.records.read_log(job_id)[-1].startswith("succeeded: test accuracy ")


def test_missing_data_fails_with_the_reason_and_the_worker_goes_on(stack):
    (stack.data / "empty").mkdir()
    missing = stack.submit(dataset="mnist", data_root=str(stack.data / "empty"))
    record = stack.wait_end(missing)
    assert record["state"] == "failed"
    assert "expected" in record["error"] and "empty" in record["error"]
    outside = stack.submit(dataset="mnist", data_root="/etc")
    record = stack.wait_end(outside)
    assert record["state"] == "failed" and "outside the worker's data directory" in record["error"]
    assert stack.wait_end(stack.submit())["state"] == "succeeded"
    stack.assert_workers_alive()


def test_a_job_its_folder_says_ended_is_not_trained_again(stack):
    # A previous attempt finished the job but Redis was unreachable for its final write,
    # so the reaper requeued it: the folder's status.json is the truth.
    job_id = new_job_id()
    stack.records.create(job_id, build_spec(TINY), "cpu")
    folder = stack.folder(job_id)
    folder.create()
    write_json(folder.status_path, {"id": job_id, "state": "succeeded", "epoch": 2,
                                    "finished_at": "2026-11-28T10:00:00.000Z", "error": None})
    write_json(folder.summary_path, {"final": {"test_accuracy": 0.5}, "total_seconds": 12.5,
                                     "per_class_accuracy": {}})
    enqueue(job_id, TINY, attempt=1, queue="cpu", app=stack.app)

    record = stack.wait_end(job_id)
    assert record["state"] == "succeeded" and record["finished_at"] == "2026-11-28T10:00:00.000Z"
    assert record["summary"] == {"final": {"test_accuracy": 0.5}, "total_seconds": 12.5}
    wait_for(lambda: f"job {job_id} had already ended succeeded; record corrected"
             in stack.worker_logs(), 30, what="the correction to be logged")
    assert folder.read_metrics() == []  # nothing was trained
    assert folder.read_status()["epoch"] == 2


def test_a_job_cancelled_while_requeued_gets_its_folder_marked(stack):
    # Handed back after some epochs, then cancelled while queued: no runner will end it, so
    # the worker that drops its message writes the record's end into the folder.
    job_id = new_job_id()
    stack.records.create(job_id, build_spec(TINY), "cpu")
    folder = stack.folder(job_id)
    folder.create()
    folder.update_status(state="running", epoch=1)
    assert stack.records.request_cancel(job_id) == "queued"
    enqueue(job_id, TINY, attempt=1, queue="cpu", app=stack.app)
    wait_for(lambda: folder.read_status()["state"] == "cancelled", 30,
             what="the folder to say cancelled")
    assert folder.read_status()["epoch"] == 1 and folder.read_metrics() == []


def test_divergence_fails_with_the_epoch(stack):
    record = stack.wait_end(stack.submit(**DIVERGE))
    assert record["state"] == "failed"
    assert "diverged at epoch" in record["error"]
    stack.assert_workers_alive()


def test_cancel_a_queued_and_a_running_job(stack, labctl_env):
    running = [stack.submit(**LONG) for _ in stack.workers]  # both workers busy
    for job_id in running:
        stack.wait_state(job_id, "running")
    waiting = stack.submit()
    labctl_env(redis_url=stack.redis.url)
    result = CliRunner().invoke(cli, ["cancel", waiting])
    assert result.exit_code == 0, result.output
    assert stack.record(waiting)["state"] == "cancelled"

    for job_id in running:
        assert stack.records.request_cancel(job_id) == "running"
    for job_id in running:
        record = stack.wait_end(job_id, timeout=30)
        assert record["state"] == "cancelled" and record["error"] == "cancelled by the user"
        status = stack.folder(job_id).read_status()
        assert status["state"] == "cancelled"  # the folder is kept, and says so
    # A worker freed by the cancel takes the cancelled job's message and drops it.
    wait_for(lambda: f"job {waiting} attempt 1 not run: terminal" in stack.worker_logs(), 30,
             what="the cancelled job's message to be dropped")
    assert stack.record(waiting)["started_at"] is None
    assert not stack.folder(waiting).exists()


def test_malformed_messages_are_rejected_and_the_worker_goes_on(stack):
    client = stack.redis.client()
    envelope = json.loads(_message_of(stack))
    bad_args = {**envelope, "body": _b64([["../../etc", {}, 1], {}, {}])}
    bad_args["headers"] = {**envelope["headers"], "id": "bad-args"}
    raw = ["this is not json", "[1, 2, 3]", json.dumps({"foo": "bar"}),
           json.dumps({**envelope, "body": _b64({"not": "a tuple"})}), json.dumps(bad_args)]
    for message in raw:
        client.lpush("cpu", message)
    # A well-formed message for a real job, with a spec field no worker knows.
    unknown = new_job_id()
    stack.records.create(unknown, build_spec(TINY), "cpu")
    enqueue(unknown, {**TINY, "bogus_field": 1}, attempt=1, queue="cpu", app=stack.app)
    record = stack.wait_end(unknown)
    assert record["state"] == "failed" and "bogus_field: unknown field" in record["error"]

    assert stack.wait_end(stack.submit())["state"] == "succeeded"
    stack.assert_workers_alive()
    wait_for(lambda: stack.worker_logs().count("rejected malformed message") >= len(raw), 30,
             what="every bad message to be logged")
    # acks_late: the last job's record says "succeeded" a moment before its message is
    # acknowledged, so wait for the ack rather than race it.
    wait_for(lambda: client.llen("cpu") == client.llen(priority_list("cpu")) == 0
             and client.hlen("unacked") == 0, 30,
             what="every message to be acknowledged or rejected")


def test_submit_wait_follow_streams_epochs_and_sets_the_exit_code(stack, labctl_env, tmp_path):
    labctl_env(redis_url=stack.redis.url)
    runner = CliRunner()
    args = ["submit", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    good = runner.invoke(cli, [*args, "--follow"])
    assert good.exit_code == 0, good.output
    job_id = good.stdout.splitlines()[0]
    assert stack.record(job_id)["state"] == "succeeded"
    assert "epoch 2/2" in good.stderr and "succeeded" in good.stderr

    diverging = tmp_path / "diverge.json"
    diverging.write_text(json.dumps({**TINY, **DIVERGE}))
    bad = runner.invoke(cli, ["submit", "-f", str(diverging), "--wait"])
    assert bad.exit_code == 1 and "diverged" in bad.stderr

    logs = runner.invoke(cli, ["logs", job_id])
    assert logs.exit_code == 0 and "epoch 1/2" in logs.stdout


def test_the_password_appears_nowhere(stack):
    job_id = stack.wait_end(stack.submit())["id"]
    places = [stack.worker_logs(), json.dumps(stack.record(job_id)),
              stack.folder(job_id).status_path.read_text(),
              "\n".join(stack.records.read_log(job_id))]
    for text in places:
        assert PASSWORD not in text
    assert "redis://:**@" in stack.workers[0].log_text()  # Celery's banner, masked


def _message_of(stack: Stack) -> str:
    """A real envelope, as Celery writes it, to corrupt by hand."""
    job_id = new_job_id()
    stack.records.create(job_id, build_spec(TINY), "cpu")
    stack.records.request_cancel(job_id)  # the worker drops it if it ever gets it
    # Sent to the gpu queue, which no worker here reads, and taken back off it.
    enqueue(job_id, TINY, attempt=1, queue="gpu", app=stack.app)
    return stack.redis.client().rpop(priority_list("gpu"))


def _b64(obj: Any) -> str:
    import base64

    return base64.b64encode(json.dumps(obj).encode()).decode()


def test_concurrency_starts_named_solo_workers_and_forwards_sigterm(stack, tmp_path):
    group = WorkerProcess(stack.redis.url, tmp_path / "group.log", name="group", queues="gpu",
                          extra_args=["--concurrency", "2"]).start()
    try:
        wait_for(lambda: group.log_text().count(" ready.") == 2, 90, interval=0.2,
                 what="both child workers")
        log = group.log_text()
        assert "group1@" in log and "group2@" in log
        group.process.terminate()
        assert group.process.wait(30) == 0
    finally:
        group.stop()
    assert "exited" not in group.log_text()  # no child was restarted


def test_sigterm_hands_the_running_job_back_to_the_queue(stack):
    """Last in the module: it stops one of the two shared workers."""
    job_id = stack.submit(**{**LONG, "epochs": 12})  # still running after the first one
    wait_for(lambda: (stack.record(job_id)["epoch"] or 0) >= 1, 60, interval=0.02,
             what="the first epoch")
    first = stack.record(job_id)["worker"]
    stopping = next(w for w in stack.workers if w.hostname == first)
    stopping.terminate()
    # Requeued at once (no heartbeat timeout) and resumed by the other worker.
    wait_for(lambda: stack.record(job_id)["attempts"] == 2, 30, what="the hand-back")
    record = stack.wait_end(job_id, timeout=120)
    assert record["state"] == "succeeded" and record["worker"] != first
    assert [row["epoch"] for row in stack.folder(job_id).read_metrics()] == list(range(1, 13))
    assert stopping.process.wait(30) == 0
    assert any(line.startswith("resumed from checkpoint") for line in
               stack.records.read_log(job_id))


def test_plain_celery_worker_uses_one_thread_not_prefork_and_runs_jobs(stack, tmp_path):
    """`celery -A labctl.worker.app worker`, without labctl's flags, must not use prefork."""
    import os
    import subprocess
    import sys

    log = tmp_path / "celery.log"
    env = {**os.environ, "LABCTL_REDIS_URL": stack.redis.url, "PYTHONUNBUFFERED": "1",
           "LABCTL_ARTIFACTS_DIR": str(stack.artifacts), "LABCTL_DATA_DIR": str(stack.data)}
    with open(log, "wb") as out:
        celery = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "labctl.worker.app", "worker", "-Q", "gpu",
             "-n", "plain@%h", "--loglevel", "info"],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: " ready." in log.read_text(), 90, interval=0.2, what="celery ready")
        assert "concurrency: 1 (thread_pool)" in log.read_text()  # our threads pool's module
        # The gpu queue, which only this worker reads here.
        job_id = submit_job(build_spec(TINY), records=stack.records, app=stack.app, queue="gpu")
        record = stack.wait_end(job_id)
        assert record["state"] == "succeeded", record["error"]
        assert record["worker"].startswith("plain@")
    finally:
        celery.terminate()
        celery.wait(30)
