"""A worker that lost its lease must not write into the job folder the new attempt owns.

The stale worker here is this test process: its heartbeat thread is never started, as if
the process had been frozen (SIGSTOP) past the lease and woke mid-epoch before the thread
noticed. A real private redis-server holds the record.
"""

from __future__ import annotations

import time

import pytest

from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.records import JobRecords, lease_key
from labctl.shared.spec import build_spec
from labctl.worker.queue_reporter import JobReleased, QueueReporter
from labctl.worker.reaper import Heartbeat
from labctl.worker.runner import Reporter, run_job

pytestmark = pytest.mark.integration

SPEC = build_spec({"model": "numpy-cnn", "dataset": "digits", "epochs": 2, "batch_size": 64,
                   "limit_train": 128, "limit_test": 64, "num_workers": 0})
STALE, CURRENT = "w1:1:1", "w2:1:2"


@pytest.fixture
def taken_over(redis_server) -> tuple[JobRecords, str]:
    """A job whose first attempt (STALE) lost its lease and was claimed again by CURRENT."""
    records = JobRecords.from_url(redis_server.url)
    job_id = new_job_id()
    records.create(job_id, SPEC, "cpu")
    assert records.claim(job_id, 1, STALE, 0.1, worker="w1") == "claimed"
    time.sleep(0.2)
    assert records.requeue_if_dead(job_id)[0] == "requeued"
    assert records.claim(job_id, 2, CURRENT, 5, worker="w2") == "claimed"
    return records, job_id


def reporter_for(records: JobRecords, job_id: str, owner: str) -> QueueReporter:
    heartbeat = Heartbeat(records, job_id, owner, interval=60, lease_seconds=5)
    return QueueReporter(records, job_id, owner, heartbeat)


def test_before_save_stops_the_stale_attempt_and_renews_the_current_one(taken_over):
    records, job_id = taken_over
    with pytest.raises(JobReleased) as released:
        reporter_for(records, job_id, STALE).before_save(1)
    assert released.value.lost

    records.client.pexpire(lease_key(job_id), 100)
    reporter_for(records, job_id, CURRENT).before_save(1)  # still ours: no exception
    assert records.client.pttl(lease_key(job_id)) > 1000  # and the lease was renewed


def test_a_stale_attempt_writes_no_epoch_into_the_folder(taken_over, tmp_path):
    records, job_id = taken_over
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(JobReleased):
        run_job(SPEC, job_id, store, reporter_for(records, job_id, STALE),
                default_data_root=str(tmp_path))
    folder = store.job(job_id)
    assert folder.read_metrics() == []
    assert not list(folder.path.glob("*.npz")) and not list(folder.path.glob("*.pt"))
    assert records.get(job_id)["metrics"] is None  # the record was not touched either


class LosesTheLeaseAtWrite(Reporter):
    """Learns it lost the job at its n-th fenced write, as a worker that woke up there."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def before_save(self, epoch: int) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise JobReleased("lease lost to another attempt", lost=True)


def _run_until_fenced(n: int, tmp_path) -> tuple[LosesTheLeaseAtWrite, object]:
    store = ArtifactStore(tmp_path / "artifacts")
    reporter = LosesTheLeaseAtWrite(n)
    with pytest.raises(JobReleased):
        run_job(SPEC, "20260101-000000-0000f1", store, reporter)
    return reporter, store.job("20260101-000000-0000f1")


def test_every_write_is_fenced_not_only_the_first_of_an_epoch(tmp_path):
    # Epoch 1: row (fence 1), checkpoint (fence 2), status (fence 3).
    _, folder = _run_until_fenced(2, tmp_path / "a")
    assert [r["epoch"] for r in folder.read_metrics()] == [1]
    assert not (folder.path / "checkpoint.npz").exists()
    _, folder = _run_until_fenced(3, tmp_path / "b")
    assert (folder.path / "checkpoint.npz").exists() and folder.read_status()["epoch"] == 0


def test_a_stale_attempt_cannot_write_the_end(tmp_path):
    # 2 epochs x 3 writes, 3 final artefact writes, then the final status: fence 10.
    reporter, folder = _run_until_fenced(10, tmp_path)
    assert folder.read_summary() is not None  # fence 9 passed: still the owner then
    assert folder.read_status()["state"] == "running"  # not "succeeded" by a stale attempt


def test_a_resumed_attempt_backfills_the_epoch_line_its_predecessor_never_logged(
        redis_server):
    # Killed between epoch 2's checkpoint and its log line: the resume starts after epoch 2.
    from labctl.worker.runner import epoch_line

    records = JobRecords.from_url(redis_server.url)
    job_id = new_job_id()
    records.create(job_id, SPEC, "cpu")
    assert records.claim(job_id, 1, CURRENT, 5) == "claimed"
    rows = [{"epoch": e, "train_loss": 1.0, "test_loss": 1.0, "test_accuracy": 0.5,
             "test_f1_macro": 0.5, "epoch_seconds": 1.0, "images_per_second": 9.0}
            for e in (1, 2)]
    # As the first attempt's reporter wrote it: the line, and that epoch 1 reached the log.
    records.append_log(job_id, "attempt 1 started on w1", epoch_line(rows[0], 2), epochs=[1])
    reporter_for(records, job_id, CURRENT).on_start(
        job_id, SPEC, {"start_epoch": 2, "finished_rows": rows})
    log = records.read_log(job_id)
    assert [line.split()[1] for line in log if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert log[-1] == "resumed from checkpoint after epoch 2"
