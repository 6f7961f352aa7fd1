"""Reliability with real processes: one writer per job folder, a Redis that forgets, and
commands that say what happened (a private redis-server, real workers and `labctl run`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from labctl.cli import logs as logs_module
from labctl.cli.main import cli
from labctl.shared import folder_lock
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import submit_job
from labctl.shared.records import JobRecords, job_key
from labctl.shared.spec import build_spec
from labctl.shared.testing import RedisServer, WorkerProcess, stop_all, wait_for
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

#: Long enough that the job is still training when the test acts; every test ends it.
LONG = {"model": "numpy-cnn", "dataset": "digits", "epochs": 400, "batch_size": 64,
        "limit_train": 256, "limit_test": 64, "num_workers": 0}


def env_for(tmp_path: Path, redis_url: str | None = None) -> dict[str, str]:
    (tmp_path / "data").mkdir(exist_ok=True)
    env = {"LABCTL_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "LABCTL_DATA_DIR": str(tmp_path / "data"),
           "LABCTL_HEARTBEAT_SECONDS": "0.3", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "3"}
    if redis_url:
        env["LABCTL_REDIS_URL"] = redis_url
    return env


def labctl(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *args: str):
    from labctl.shared.settings import get_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def epochs_in(folder) -> list[int]:
    return [row["epoch"] for row in folder.read_metrics()]


def start_local_run(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "labctl.cli.main", "run", *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def spec_args(values: dict) -> list[str]:
    return [part for key, value in values.items()
            for part in (f"--{key.replace('_', '-')}", str(value))]


def test_a_local_resume_of_a_job_a_worker_runs_is_refused(redis_server, tmp_path,
                                                          monkeypatch):
    env = env_for(tmp_path, redis_server.url)
    records = JobRecords.from_url(redis_server.url)
    worker = WorkerProcess(redis_server.url, tmp_path / "w1.log", name="w1", env=env)
    try:
        worker.start().wait_ready()
        job_id = submit_job(build_spec(LONG), records=records, app=make_app(redis_server.url))
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 2, 120, interval=0.05,
                 what="two epochs on the worker")
        folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id)
        log_before = folder.read_log()
        assert {"name": worker.hostname, "queues": ["cpu", "gpu"]}.items() <= next(
            w for w in records.live_workers() if w["name"] == worker.hostname).items()

        result = labctl(env, monkeypatch, "run", "--resume", job_id)
        assert result.exit_code == 4
        assert result.stderr.strip() == (f"labctl: job {job_id} is running on worker "
                                         f"{worker.hostname}; cancel it first "
                                         f"(labctl cancel {job_id})")
        assert not any("resumed" in line for line in folder.read_log()[len(log_before):])

        # The worker's run holds the folder too: a local writer that skipped the record
        # check would still be kept out.
        assert folder_lock.holder(folder.path).startswith(f"worker {worker.hostname} (pid ")
        assert labctl(env, monkeypatch, "cancel", job_id).exit_code == 0
        wait_for(lambda: records.state(job_id) in TERMINAL_STATES, 60, what="the cancel")
    finally:
        stop_all([worker])
    epochs = epochs_in(folder)
    assert epochs == list(range(1, len(epochs) + 1))  # each epoch once, one writer


def test_two_local_runs_never_share_a_folder_and_a_killed_one_is_abandoned(tmp_path,
                                                                           monkeypatch):
    port_free_url = "redis://127.0.0.1:1/0"  # no Redis: local runs need none
    env = env_for(tmp_path, port_free_url)
    store = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"])
    first = start_local_run(env, tmp_path / "first.log", *spec_args(LONG))
    try:
        wait_for(lambda: store.job_ids() and epochs_in(store.job(store.job_ids()[0])), 120,
                 interval=0.05, what="the first local run's first epoch")
        job_id = store.job_ids()[0]
        folder = store.job(job_id)

        second = labctl(env, monkeypatch, "run", "--resume", job_id)
        assert second.exit_code == 4, second.output
        assert second.stderr.startswith(f"labctl: job {job_id}: its folder is being written "
                                        f"by a local run (pid {first.pid} on ")
        assert second.stderr.count("\n") == 1

        cancel = labctl(env, monkeypatch, "cancel", job_id)
        assert cancel.exit_code == 4
        assert f"job {job_id} runs locally (pid {first.pid} on " in cancel.stderr
        assert "Ctrl-C" in cancel.stderr

        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    status = labctl(env, monkeypatch, "status", job_id, "--json")
    assert json.loads(status.stdout)["state"] == "abandoned"
    assert "resume it with labctl run --resume" in json.loads(status.stdout)["error"]
    listed = labctl(env, monkeypatch, "list", "--json")
    assert [job["state"] for job in json.loads(listed.stdout)] == ["abandoned"]
    cancel = labctl(env, monkeypatch, "cancel", job_id)
    assert cancel.exit_code == 0 and "abandoned" in cancel.stderr

    # Its lock died with it: the job resumes here, each epoch once.
    done_before = len(epochs_in(folder))
    resumed = labctl(env, monkeypatch, "run", "--resume", job_id, "--epochs",
                     str(done_before + 2), "--json")
    assert resumed.exit_code == 0, resumed.output
    assert epochs_in(folder) == list(range(1, done_before + 3))


def test_a_worker_whose_redis_forgot_the_job_restores_it_and_finishes(tmp_path, monkeypatch):
    epochs = 40
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        env = env_for(tmp_path, server.url)
        records = JobRecords.from_url(server.url)
        worker = WorkerProcess(server.url, tmp_path / "w1.log", name="w1", env=env)
        try:
            worker.start().wait_ready()
            job_id = submit_job(build_spec({**LONG, "epochs": epochs}), records=records,
                                app=make_app(server.url))
            wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 2, 120, interval=0.05,
                     what="two epochs")
            server.restart()  # no persistence: every record and queue is gone
            assert records.get(job_id) is None or records.get(job_id).get("restored_at")

            wait_for(lambda: records.state(job_id) in TERMINAL_STATES, 180, interval=0.2,
                     what="the job to finish after Redis forgot it")
            record = records.get(job_id)
        finally:
            stop_all([worker])
        assert record["state"] == "succeeded", record.get("error")
        assert record["restored_at"] and record["worker"] == worker.hostname
        folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id)
        assert epochs_in(folder) == list(range(1, epochs + 1))
        assert folder.read_status()["state"] == "succeeded"
        assert "restored from the job folder" in worker.log_text()
        log = records.read_log(job_id)  # the folder's log.txt, then the lines that followed
        assert sum(line.startswith(f"epoch 1/{epochs} ") for line in log) == 1
        assert log[-1].startswith("succeeded: test accuracy")
        assert "lease lost" not in worker.log_text(), worker.log_text()[-6000:]
        listed = labctl(env, monkeypatch, "list", "--json")
        assert [job["id"] for job in json.loads(listed.stdout)] == [job_id]


def test_list_and_status_read_the_folders_of_jobs_redis_has_no_record_of(
        redis_server, tmp_path, monkeypatch):
    env = env_for(tmp_path, redis_server.url)
    records = JobRecords.from_url(redis_server.url)
    store = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"])
    queued = new_job_id()
    records.create(queued, build_spec(LONG), "cpu")
    lost = store.job(new_job_id()).create()
    (lost.path / "spec.json").write_text(json.dumps(build_spec(LONG).model_dump(mode="json")))
    lost.update_status(state="succeeded", epoch=400, epochs=400, worker="w9@elsewhere")

    listed = labctl(env, monkeypatch, "list")
    assert listed.exit_code == 0
    rows = {tuple(line.split()[:2]) for line in listed.stdout.splitlines()[1:]}
    assert rows == {(lost.job_id, "succeeded"), (queued, "queued")}
    assert "1 job(s) read from their folders" in listed.stderr
    status = labctl(env, monkeypatch, "status", lost.job_id)
    assert status.exit_code == 0
    assert "its job folder (Redis has no record of this job)" in status.stdout


def test_logs_follow_of_a_record_that_vanishes_says_so_and_exits_non_zero(
        redis_server, tmp_path, monkeypatch):
    env = env_for(tmp_path, redis_server.url)
    records = JobRecords.from_url(redis_server.url)
    job_id = new_job_id()
    records.create(job_id, build_spec(LONG), "cpu")
    records.claim(job_id, 1, "w:1:1", 30, worker="w")
    records.append_log(job_id, "attempt 1 started on w")
    monkeypatch.setattr(logs_module, "FOLLOW_OUTAGE_SECONDS", 1.0)
    real_read_log = JobRecords.read_log

    def read_then_forget(self, *args, **kwargs):
        lines = real_read_log(self, *args, **kwargs)
        self.client.delete(job_key(job_id))  # as a Redis restart without persistence
        return lines

    monkeypatch.setattr(JobRecords, "read_log", read_then_forget)
    result = labctl(env, monkeypatch, "logs", "--follow", job_id)
    assert result.exit_code == 3
    assert "Redis no longer has its record" in result.stderr
    assert result.stdout == "attempt 1 started on w\n"


def test_a_cancel_after_a_hand_back_says_how_far_the_job_got(redis_server, tmp_path,
                                                             monkeypatch):
    env = env_for(tmp_path, redis_server.url)
    records = JobRecords.from_url(redis_server.url)
    job_id = new_job_id()
    records.create(job_id, build_spec(LONG), "cpu")
    records.claim(job_id, 1, "w:1:1", 30, worker="w")
    records.update_owned(job_id, "w:1:1", epoch=7)
    assert records.release(job_id, "w:1:1") == ("requeued", 2)

    result = labctl(env, monkeypatch, "cancel", job_id)
    assert result.exit_code == 0
    assert f"cancelled job {job_id} after 7 epochs" in result.stderr
    assert records.get(job_id)["error"] == "cancelled by the user after 7 epochs"


def test_a_cancel_of_a_job_whose_worker_is_gone_ends_it_at_once(redis_server, tmp_path,
                                                               monkeypatch):
    env = env_for(tmp_path, redis_server.url)
    records = JobRecords.from_url(redis_server.url)
    job_id = new_job_id()
    records.create(job_id, build_spec(LONG), "cpu")
    records.claim(job_id, 1, "w:1:1", 0.05, worker="w")  # its lease lapses at once
    folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id).create()
    folder.update_status(state="running", epoch=3)
    wait_for(lambda: not records.client.exists(f"{job_key(job_id)}:lease"), 5)

    result = labctl(env, monkeypatch, "cancel", job_id)
    assert result.exit_code == 0 and "its worker had stopped" in result.stderr
    assert records.state(job_id) == "cancelled" and records.running_ids() == []
    assert folder.read_status()["state"] == "cancelled"  # nobody else would write it


def test_submit_follow_says_when_no_worker_takes_the_queue(redis_server, tmp_path):
    env = env_for(tmp_path, redis_server.url)
    process = subprocess.Popen(
        [sys.executable, "-m", "labctl.cli.main", "submit", "--model", "numpy-cnn",
         "--dataset", "digits", "--epochs", "1", "--follow"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = process.stdout.readline().strip()
        lines = []
        while not any("no worker" in line for line in lines):
            line = process.stderr.readline()
            assert line, f"submit ended without the notice: {lines}"
            lines.append(line)
        assert lines[-1].strip() == ("labctl: no worker is taking jobs from the cpu queue; "
                                     "start one with: labctl worker -Q cpu (still waiting)")
        assert process.poll() is None  # it keeps waiting
        records = JobRecords.from_url(redis_server.url)
        records.request_cancel(job_id)
        process.wait(timeout=30)
        assert process.returncode == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
