"""The queue commands' output and exit codes, against a real private redis-server.

No worker here: records are written directly, as a worker would, so each command's reading
side is checked on its own. End-to-end runs are in test_queue_worker.py.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.celery_config import priority_list
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import free_port

pytestmark = pytest.mark.integration

SPEC = build_spec({"model": "numpy-cnn", "dataset": "digits", "epochs": 3})
ROW = {"epoch": 1, "train_loss": 1.5, "test_loss": 1.2, "test_accuracy": 0.75,
       "test_f1_macro": 0.7, "epoch_seconds": 0.5, "images_per_second": 3000.0, "lr": 0.002}


@pytest.fixture
def env(redis_server, labctl_env):
    return labctl_env(redis_url=redis_server.url)


@pytest.fixture
def records(env, redis_server) -> JobRecords:
    return JobRecords.from_url(redis_server.url)


def labctl(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def running_job(records: JobRecords) -> str:
    job_id = new_job_id()
    records.create(job_id, SPEC, "cpu")
    records.claim(job_id, 1, "w1@host:1:1", 30, worker="w1@host", artifacts=f"/a/{job_id}")
    records.update_owned(job_id, "w1@host:1:1", epoch=1, metrics=ROW)
    records.append_log(job_id, "attempt 1 started on w1@host", "epoch 1/3 train_loss=1.5000")
    return job_id


def test_status_json_has_the_contract_fields(records):
    job_id = running_job(records)
    result = labctl("status", job_id, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    for key in ("id", "state", "epoch", "epochs", "metrics", "error", "artifacts"):
        assert key in status
    assert status["id"] == job_id and status["state"] == "running"
    assert (status["epoch"], status["epochs"]) == (1, 3)
    assert status["metrics"]["test_accuracy"] == 0.75
    assert status["worker"] == "w1@host" and status["attempts"] == 1
    assert "owner" not in status  # the lease token is internal


def test_status_for_humans(records):
    job_id = running_job(records)
    result = labctl("status", job_id)
    assert result.exit_code == 0
    assert "running" in result.stdout and "1/3" in result.stdout
    assert "test_accuracy=0.7500" in result.stdout


def test_status_falls_back_to_a_local_run_folder(env):
    job_id = new_job_id()
    ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id).create().update_status(
        state="succeeded", epoch=3, epochs=3)
    status = json.loads(labctl("status", job_id, "--json").stdout)
    assert status["state"] == "succeeded" and status["artifacts"].endswith(job_id)


def test_unknown_job_exits_3(records):
    for command in ("status", "logs", "cancel"):
        result = labctl(command, new_job_id())
        assert result.exit_code == 3, (command, result.output)
        assert "no job" in result.stderr


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "20260101-000000-abc/../x", "*", ""])
def test_invalid_job_id_exits_2_before_touching_redis(bad_id, labctl_env):
    labctl_env(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nobody listens: no I/O
    for command in ("status", "logs", "cancel"):
        result = labctl(command, bad_id)
        assert result.exit_code == 2, (command, result.output)
        assert "invalid job id" in result.stderr
        assert "Traceback" not in result.output


def test_unreachable_broker_exits_69_quickly_without_the_password(labctl_env):
    port = free_port()
    labctl_env(redis_url=f"redis://:s3cret-pw@127.0.0.1:{port}/2")
    for args in (["list"], ["status", new_job_id()], ["logs", new_job_id()],
                 ["cancel", new_job_id()],
                 ["submit", "--model", "numpy-cnn", "--dataset", "digits"]):
        started = time.monotonic()
        result = labctl(*args)
        assert result.exit_code == 69, (args, result.output)
        assert time.monotonic() - started < 5
        assert f"127.0.0.1:{port}" in result.stderr
        assert "s3cret-pw" not in result.output
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_a_database_number_out_of_range_exits_2(redis_server, labctl_env):
    labctl_env(redis_url=f"redis://127.0.0.1:{redis_server.port}/99")
    result = labctl("list")
    assert result.exit_code == 2
    assert result.stderr.startswith("labctl: LABCTL_REDIS_URL: its database number is out of")


def test_wrong_password_exits_69(tmp_path, labctl_env):
    from labctl.shared.testing import RedisServer

    with RedisServer(tmp_path / "pw", password="right-pw") as server:
        labctl_env(redis_url=f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        result = labctl("list")
        assert result.exit_code == 69
        assert "credentials" in result.stderr and "wrong-pw" not in result.output


def test_list_table_and_json_and_state_filter(records):
    first = running_job(records)
    second = new_job_id()
    records.create(second, SPEC, "cpu")
    records.request_cancel(second)
    table = labctl("list")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "STATE"]
    assert {line.split()[0] for line in lines[1:]} == {first, second}
    listed = json.loads(labctl("list", "--json").stdout)
    assert [job["id"] for job in listed][0] == second  # newest first
    only = json.loads(labctl("list", "--state", "cancelled", "--json").stdout)
    assert [job["id"] for job in only] == [second]
    assert json.loads(labctl("list", "--limit", "1", "--json").stdout)[0]["id"] == second
    assert labctl("list", "--state", "bogus").exit_code == 2


def test_list_with_no_jobs(records):
    result = labctl("list")
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(labctl("list", "--json").stdout) == []


def test_logs_prints_the_lines_from_redis(records):
    job_id = running_job(records)
    result = labctl("logs", job_id)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["attempt 1 started on w1@host",
                                          "epoch 1/3 train_loss=1.5000"]


def test_logs_json(records):
    job_id = running_job(records)
    logs = json.loads(labctl("logs", job_id, "--json").stdout)
    assert logs == {"id": job_id, "state": "running",
                    "lines": ["attempt 1 started on w1@host", "epoch 1/3 train_loss=1.5000"]}


def test_logs_follow_stops_when_the_job_ends(records):
    job_id = running_job(records)
    records.update_owned(job_id, "w1@host:1:1", state="succeeded")
    records.append_log(job_id, "the end")
    result = labctl("logs", job_id, "--follow")
    assert result.exit_code == 0 and result.stdout.splitlines()[-1] == "the end"


def test_cancel_queued_and_running(records):
    waiting = new_job_id()
    records.create(waiting, SPEC, "cpu")
    result = labctl("cancel", waiting)
    assert result.exit_code == 0 and "will not start" in result.stderr
    assert records.get(waiting)["state"] == "cancelled"

    job_id = running_job(records)
    result = labctl("cancel", job_id)
    assert result.exit_code == 0 and "stops after its current batch" in result.stderr
    assert records.cancel_requested(job_id)
    again = labctl("cancel", waiting)
    assert again.exit_code == 0 and "already cancelled" in again.stderr


def test_submit_prints_the_id_first_and_routes_by_model(records, redis_server):
    result = labctl("submit", "--model", "numpy-cnn", "--dataset", "digits", "--epochs", "2")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.splitlines()[0]
    record = records.get(job_id)
    assert record["state"] == "queued" and record["queue"] == "cpu"
    assert record["spec"]["data_root"] is None  # resolved by the worker
    client = redis_server.client()
    cpu, gpu = priority_list("cpu"), priority_list("gpu")  # normal priority
    assert client.llen(cpu) == 1 and client.llen(gpu) == 0
    message = json.loads(client.lindex(cpu, 0))
    assert message["headers"]["task"] == "labctl.run_job"
    assert message["headers"]["id"] == f"{job_id}.1"


def test_submit_with_only_the_optimizer_is_the_flagship_run(records, redis_server):
    result = labctl("submit", "--opt", "adamax")
    assert result.exit_code == 0, result.output
    record = records.get(result.stdout.splitlines()[0])
    assert (record["model"], record["optimizer"], record["dataset"]) == \
        ("resnet50", "adamax", "stanford-cars")
    assert record["queue"] == "gpu" and redis_server.client().llen(priority_list("gpu")) == 1


def test_submit_json_and_bad_spec(records):
    result = labctl("submit", "--model", "numpy-cnn", "--dataset", "digits", "--json")
    assert json.loads(result.stdout)["state"] == "queued"
    bad = labctl("submit", "--epochs", "0")
    assert bad.exit_code == 2 and "epochs" in bad.stderr


def test_worker_exits_2_when_its_metrics_port_is_taken(labctl_env):
    import socket

    labctl_env()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(cli, ["worker", "--metrics-port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"labctl: --metrics-port {port}: Address already in use"


def test_logs_follow_rides_over_a_redis_restart(records, redis_server):
    # The job trains on through a short outage (its lease outlives it); so must a follower.
    import threading

    job_id = running_job(records)

    def restart_then_finish():
        time.sleep(0.5)
        redis_server.restart(downtime=2.0)  # same port, data from the append-only file
        after = JobRecords.from_url(redis_server.url)
        after.append_log(job_id, "the end")
        after.update_owned(job_id, "w1@host:1:1", state="succeeded")

    restarter = threading.Thread(target=restart_then_finish)
    restarter.start()
    try:
        result = labctl("logs", job_id, "--follow")
    finally:
        restarter.join()
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "the end"
    assert result.stdout.count("epoch 1/3") == 1  # nothing printed twice after the outage
