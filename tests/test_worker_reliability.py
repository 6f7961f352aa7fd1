"""Workers that must not work, or must stop working, with real processes: children that die
with their supervisor, a shutting-down worker that claims nothing, a worker that cannot
write its artefacts, a dataset too big for the host, one-line failures and distinct
worker names (a private redis-server and real `labctl worker` processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.cli.worker_cmd import worker as worker_command
from labctl.shared.artifacts import ArtifactStore
from labctl.shared.celery_config import PRIORITY_SEP, PRIORITY_STEPS
from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import submit_job
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import WorkerProcess, stop_all, wait_for
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

TINY = {"model": "numpy-cnn", "dataset": "digits", "epochs": 1, "batch_size": 64,
        "limit_train": 128, "limit_test": 64, "num_workers": 0}
#: Still running a few seconds after its first epoch, and done within a minute or two.
MEDIUM = {**TINY, "epochs": 16, "batch_size": 16, "limit_train": None, "limit_test": 128}


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"LABCTL_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
            "LABCTL_DATA_DIR": str(tmp_path / "data"),
            "LABCTL_HEARTBEAT_SECONDS": "0.3", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "3", **extra}


def submit(server, records: JobRecords, values: dict) -> str:
    return submit_job(build_spec(values), records=records, app=make_app(server.url))


def wait_end(records: JobRecords, job_id: str, timeout: float = 180) -> dict:
    wait_for(lambda: records.state(job_id) in TERMINAL_STATES, timeout, interval=0.1,
             what=f"job {job_id} to end")
    return records.get(job_id)


def epochs_in(store: ArtifactStore, job_id: str) -> list[int]:
    return [row["epoch"] for row in store.job(job_id).read_metrics()]


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, Z...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def gone(pid: int) -> bool:
    return process_state(pid) in (None, "Z", "X")  # a zombie runs nothing


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def queued_messages(server, queue: str = "cpu") -> int:
    client = server.client()
    return sum(client.llen(queue if not step else f"{queue}{PRIORITY_SEP}{step}")
               for step in PRIORITY_STEPS)


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


# --- item 2: no orphans, no claim while stopping --------------------------------------


@linux_only
def test_children_die_with_a_killed_supervisor_and_the_lease_recovers_their_job(
        redis_server, tmp_path):
    env = env_for(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    store = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"])
    group = WorkerProcess(redis_server.url, tmp_path / "group.log", name="group", queues="cpu",
                          env=env, extra_args=["--concurrency", "2"]).start()
    children: list[int] = []
    rescuer = WorkerProcess(redis_server.url, tmp_path / "rescuer.log", name="rescuer",
                            queues="cpu", env=env)
    try:
        wait_for(lambda: group.log_text().count(" ready.") == 2, 120, interval=0.2,
                 what="both child workers")
        children = children_of(group.pid)
        assert len(children) == 2
        job_id = submit(redis_server, records, MEDIUM)
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 120, interval=0.02,
                 what="the first epoch on a child")
        os.kill(group.pid, signal.SIGKILL)
        group.process.wait()

        wait_for(lambda: all(gone(pid) for pid in children), 30, interval=0.1,
                 what="the children to die with their supervisor")
        assert records.get(job_id)["state"] == "running"  # nobody has told Redis yet
        rescuer.start().wait_ready()
        record = wait_end(records, job_id)
    finally:
        for pid in children:  # started by the supervisor for this test, and only they
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        stop_all([group, rescuer])
    assert record["state"] == "succeeded", record["error"]
    assert record["attempts"] == 2 and record["worker"] == rescuer.hostname
    assert epochs_in(store, job_id) == list(range(1, MEDIUM["epochs"] + 1))


@linux_only
def test_a_child_whose_supervisor_is_already_gone_exits_at_once(tmp_path):
    """The race the parent-death signal alone leaves open: the supervisor dies between
    starting a child and the child arming the signal."""
    env = {**os.environ, **env_for(tmp_path), "LABCTL_SUPERVISOR_PID": "999999999",
           "LABCTL_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "labctl.cli.main", "worker"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def message_popped_for_a_frozen_worker(server, records: JobRecords,
                                       worker: WorkerProcess) -> str:
    """Freeze ``worker`` while it waits on Redis for a message, and submit a job: Redis
    pops the message for that pending read, which the worker sees only once it runs again.
    Frozen between two reads, it would leave the message queued: let that job run, retry."""
    for _ in range(10):
        os.kill(worker.pid, signal.SIGSTOP)
        job_id = submit(server, records, TINY)
        try:
            wait_for(lambda: queued_messages(server) == 0, 3, interval=0.05,
                     what="a pending read to take the message")
            return job_id
        except TimeoutError:
            os.kill(worker.pid, signal.SIGCONT)
            wait_end(records, job_id)
    raise AssertionError("the worker never had a read pending when frozen")


def test_a_worker_told_to_stop_claims_no_new_job(redis_server, tmp_path):
    """SIGTERM reaching a worker at the moment a message reaches it (with --concurrency 2
    this was the job the other child had just handed back): the job keeps its attempt and
    its message goes back to the queue for a worker that stays."""
    env = env_for(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    stopping = WorkerProcess(redis_server.url, tmp_path / "stopping.log", name="stopping",
                             queues="cpu", env=env)
    staying = WorkerProcess(redis_server.url, tmp_path / "staying.log", name="staying",
                            queues="cpu", env=env)
    try:
        stopping.start().wait_ready()
        job_id = message_popped_for_a_frozen_worker(redis_server, records, stopping)
        os.kill(stopping.pid, signal.SIGTERM)
        os.kill(stopping.pid, signal.SIGCONT)
        assert stopping.process.wait(60) == 0
        record = records.get(job_id)
        assert (record["state"], record["attempts"]) == ("queued", 1)
        # Put back by the task ("not claimed: this worker is shutting down") or, when the
        # consumer was cancelled first, by kombu: either way once, as attempt 1.
        assert queued_messages(redis_server) == 1

        staying.start().wait_ready()
        record = wait_end(records, job_id)
    finally:
        stop_all([stopping, staying])
    assert (record["state"], record["attempts"], record["worker"]) == \
        ("succeeded", 1, staying.hostname)


def test_one_sigterm_of_a_group_costs_its_running_job_one_attempt(redis_server, tmp_path):
    """The report: SIGTERM to `--concurrency 2` took a job from attempt 1 to 3 (one child
    handed it back, the other, stopping too, claimed it and handed it back again)."""
    env = env_for(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    group = WorkerProcess(redis_server.url, tmp_path / "group.log", name="group", queues="cpu",
                          env=env, extra_args=["--concurrency", "2"]).start()
    try:
        wait_for(lambda: group.log_text().count(" ready.") == 2, 120, interval=0.2,
                 what="both child workers")
        job_id = submit(redis_server, records, MEDIUM)
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 120, interval=0.02,
                 what="the first epoch on a child")
        group.process.terminate()
        assert group.process.wait(60) == 0
    finally:
        stop_all([group])
    record = records.get(job_id)
    assert (record["state"], record["attempts"]) == ("queued", 2)
    assert queued_messages(redis_server) == 1


# --- item 6: saying what happened ------------------------------------------------------


def labctl(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *args: str):
    from labctl.shared.settings import get_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def lines_about(log: str, job_id: str) -> list[str]:
    return [line for line in log.splitlines() if job_id in line]


@pytest.mark.parametrize("data_dir", [True, False], ids=["bad-data", "no-data-root"])
def test_an_expected_failure_is_one_line_in_the_worker_log_and_once_in_follow(
        redis_server, tmp_path, monkeypatch, data_dir):
    env = env_for(tmp_path)
    if not data_dir:
        del env["LABCTL_DATA_DIR"]  # the worker reads no dataset files at all
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", name="w", queues="cpu",
                           env=env)
    try:
        worker.start().wait_ready()
        result = labctl({**env, "LABCTL_REDIS_URL": redis_server.url}, monkeypatch,
                        "submit", "--model", "numpy-cnn", "--dataset", "mnist",
                        "--epochs", "1", "--follow")
        job_id = result.stdout.splitlines()[0]
        error = JobRecords.from_url(redis_server.url).get(job_id)["error"]
        wait_for(lambda: "failed" in "".join(lines_about(worker.log_text(), job_id)), 30,
                 what="the worker's line about the failure")
    finally:
        stop_all([worker])
    assert result.exit_code == 1
    assert ("expected train-images-idx3-ubyte" if data_dir else "no LABCTL_DATA_DIR") in error
    assert result.stderr.count(error) == 1, result.stderr
    assert result.stderr.strip().endswith(f"labctl: job {job_id} failed")
    log = worker.log_text()
    assert [line for line in lines_about(log, job_id) if "failed" in line] == [
        line for line in lines_about(log, job_id) if error in line]
    assert len([line for line in lines_about(log, job_id) if error in line]) == 1
    assert "Traceback" not in log and "Reject" not in log


def test_two_workers_on_one_host_get_distinct_names_by_default(redis_server, tmp_path):
    env = env_for(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    default = ["--hostname", "labctl-%p@%h"]  # the default, past the helper's own --hostname
    workers = [WorkerProcess(redis_server.url, tmp_path / f"d{i}.log", name=f"d{i}",
                             queues="cpu", env=env, extra_args=default) for i in (1, 2)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
        wait_for(lambda: len(records.live_workers()) == 2, 30, what="both announcements")
        names = {w["name"]: w["pid"] for w in records.live_workers()}
    finally:
        stop_all(workers)
    host = socket.gethostname()
    assert names == {f"labctl-{w.pid}@{host}": w.pid for w in workers}
    assert next(option.default for option in worker_command.params
                if option.name == "hostname") == "labctl-%p@%h"


def test_a_name_a_running_worker_has_is_refused_and_a_dead_ones_is_free(redis_server,
                                                                       tmp_path):
    env = env_for(tmp_path)
    first = WorkerProcess(redis_server.url, tmp_path / "first.log", name="dup", queues="cpu",
                          env=env)
    second = WorkerProcess(redis_server.url, tmp_path / "second.log", name="dup",
                           queues="cpu", env=env)
    third = WorkerProcess(redis_server.url, tmp_path / "third.log", name="dup", queues="cpu",
                          env=env)
    try:
        first.start().wait_ready()
        assert second.start().process.wait(60) == 4
        assert second.log_text().strip().splitlines() == [
            f"labctl: worker name {first.hostname} is taken by a running worker (pid "
            f"{first.pid} on {socket.gethostname()}); give this one another: --hostname "
            "NAME@%h (or leave it out: the default labctl-%p@%h is unique on a host)"]
        first.kill()
        # Its entry outlives it (until its ttl, seconds): as if it had just died.
        assert redis_server.client().pexpire(f"labctl:worker:{first.hostname}", 60_000)
        third.start().wait_ready()
    finally:
        stop_all([first, second, third])


# --- item 5: a worker that cannot work -------------------------------------------------


@contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small filesystem of its own at ``path`` (needs the right to mount: root)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                            str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:  # the mode bits stop anyone but root
        path.mkdir(parents=True)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with tmpfs(path, "ro", "size=1g") as mounted:  # room enough: only read-only
        yield mounted


@contextmanager
def full_dir(path: Path) -> Iterator[Path]:
    with tmpfs(path, "size=2m") as mounted:
        with open(mounted / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:  # ENOSPC: full
                pass
        yield mounted


def worker_refusal(redis_server, tmp_path: Path, artifacts: Path) -> tuple[int, str, dict]:
    env = {**env_for(tmp_path), "LABCTL_ARTIFACTS_DIR": str(artifacts)}
    records = JobRecords.from_url(redis_server.url)
    job_id = submit(redis_server, records, TINY)
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", name="w", queues="cpu",
                           env=env).start()
    try:
        code = worker.process.wait(60)
    finally:
        worker.stop()
    return code, worker.log_text(), records.get(job_id)


@pytest.mark.parametrize("inside", [False, True], ids=["the-dir", "a-dir-to-create-in-it"])
def test_a_worker_with_a_read_only_artifacts_dir_says_so_and_takes_no_job(redis_server,
                                                                          tmp_path, inside):
    with read_only_dir(tmp_path / "ro") as read_only:
        artifacts = read_only / "store" if inside else read_only
        code, log, record = worker_refusal(redis_server, tmp_path, artifacts)
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    problem = f"cannot be created: {reason}" if inside else f"is not writable: {reason}"
    assert code == 73
    assert log.splitlines() == [f"labctl: the artifacts directory {artifacts} {problem}; "
                                "this worker takes no jobs (LABCTL_ARTIFACTS_DIR)"]
    assert (record["state"], record["attempts"]) == ("queued", 1)


def test_a_worker_with_a_full_artifacts_dir_says_so_and_takes_no_job(redis_server, tmp_path):
    with full_dir(tmp_path / "full") as artifacts:
        code, log, record = worker_refusal(redis_server, tmp_path, artifacts)
    assert code == 73
    assert log.splitlines() == [
        f"labctl: the artifacts directory {artifacts} is full: 0.0 MiB free, a worker needs "
        "at least 64 MiB; this worker takes no jobs (LABCTL_ARTIFACTS_DIR)"]
    assert (record["state"], record["attempts"]) == ("queued", 1)


def test_a_job_whose_dataset_cannot_fit_in_memory_is_refused_before_loading(redis_server,
                                                                            tmp_path):
    env = env_for(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", name="w", queues="cpu",
                           env=env)
    try:
        worker.start().wait_ready()
        huge = submit(redis_server, records, {**TINY, "dataset": "synthetic",
                                              "image_size": 1024, "limit_train": 10_000_000})
        record = wait_end(records, huge, 60)
        # The worker is fine and takes the next job.
        assert wait_end(records, submit(redis_server, records, TINY))["state"] == "succeeded"
    finally:
        stop_all([worker])
    assert record["state"] == "failed"
    assert record["error"].startswith("dataset synthetic at 1024 px needs about 117,188.2 GiB "
                                      "of memory (10,000,000 train + 64 test images")
    assert [line for line in worker.log_text().splitlines() if huge in line and "failed" in
            line] == [line for line in worker.log_text().splitlines() if record["error"] in line]
    assert "Traceback" not in worker.log_text()


def test_a_malformed_task_message_is_one_line_too(redis_server, tmp_path):
    from labctl.shared.celery_config import TASK_NAME

    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", name="w", queues="cpu",
                           env=env_for(tmp_path))
    try:
        worker.start().wait_ready()
        make_app(redis_server.url).send_task(TASK_NAME, args=["../../etc", {}, 1],
                                             queue="cpu", task_id="bad-args")
        wait_for(lambda: "rejected malformed message bad-args" in worker.log_text(), 30,
                 what="the worker's line about it")
        wait_for(lambda: redis_server.client().hlen("unacked") == 0, 30, what="the ack")
    finally:
        stop_all([worker])
    log = worker.log_text()
    assert [line for line in log.splitlines() if "bad-args" in line][-1].endswith(
        "rejected malformed message bad-args: invalid job id '../../etc' (expected "
        "YYYYMMDD-HHMMSS-xxxxxx)")
    assert "Traceback" not in log and "Reject" not in log


def test_a_rejected_message_is_one_log_line_without_a_traceback():
    # Celery's own logging path for a Reject (the task raised it: Redis unavailable at the
    # claim, or a shutdown), through the filter the worker installs on its logger.
    import logging

    from celery.app.task import Context
    from celery.app.trace import TraceInfo
    from celery.exceptions import Reject

    import labctl.worker.tasks  # noqa: F401 - registers the task, as the worker's include does
    from labctl.shared.celery_config import TASK_NAME
    from labctl.worker.app import app, drop_reject_traceback

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    trace_log = logging.getLogger("celery.app.trace")
    handler = Keep()
    trace_log.addHandler(handler)
    try:
        for with_filter in (False, True):
            if with_filter:
                trace_log.addFilter(drop_reject_traceback)
            try:
                raise Reject("Redis unavailable: Connection refused", requeue=True)
            except Reject as exc:
                TraceInfo("REJECTED", exc).handle_reject(app.tasks[TASK_NAME], Context(
                    id="20260101-000000-000001.1", hostname="w", args=[], kwargs={}))
    finally:
        trace_log.removeHandler(handler)
        trace_log.removeFilter(drop_reject_traceback)
    unfiltered, filtered = records
    assert unfiltered.exc_info is not None  # Celery's default: with the traceback
    assert filtered.exc_info is None
    line = logging.Formatter("%(levelname)s %(message)s").format(filtered)
    assert line.count("\n") == 0 and "Redis unavailable: Connection refused" in line, line
