"""The job record state machine, against a real private redis-server (no workers)."""

from __future__ import annotations

import threading
import time

import pytest

from labctl.shared.artifacts import new_job_id
from labctl.shared.queue import route_for
from labctl.shared.records import RUNNING_KEY, JobRecords, lease_key
from labctl.shared.spec import build_spec

pytestmark = pytest.mark.integration

SPEC = build_spec({"model": "numpy-cnn", "dataset": "digits", "epochs": 3})


@pytest.fixture
def records(redis_server) -> JobRecords:
    return JobRecords.from_url(redis_server.url)


def queued(records: JobRecords, spec=SPEC) -> str:
    job_id = new_job_id()
    records.create(job_id, spec, route_for(spec))
    return job_id


def test_route_for_follows_the_model_and_device():
    assert route_for(build_spec({"model": "numpy-cnn"})) == "cpu"
    assert route_for(build_spec({"model": "resnet50"})) == "gpu"
    assert route_for(build_spec({"model": "resnet50", "device": "cpu"})) == "cpu"
    assert route_for(build_spec({"model": "resnet50", "device": "cuda:1"})) == "gpu"


def test_create_then_read_back_with_types(records):
    job_id = queued(records)
    record = records.get(job_id)
    assert record["state"] == "queued" and record["attempts"] == 1
    assert record["epochs"] == 3 and record["metrics"] is None
    assert record["queue"] == "cpu" and record["model"] == "numpy-cnn"
    assert record["spec"]["optimizer"] == "adamax"
    assert records.get(new_job_id()) is None


def test_claim_runs_each_attempt_once(records):
    job_id = queued(records)
    assert records.claim(job_id, 1, "w1:1:1", 5, worker="w1") == "claimed"
    assert records.claim(job_id, 1, "w2:1:1", 5, worker="w2") == "busy"
    assert records.get(job_id)["worker"] == "w1"
    assert records.claim(job_id, 2, "w2:1:2", 5) == "stale"  # no such attempt yet
    assert records.update_owned(job_id, "w1:1:1", state="succeeded")
    assert records.claim(job_id, 1, "w2:1:1", 5) == "terminal"
    assert records.claim(new_job_id(), 1, "w2:1:1", 5) == "missing"
    assert job_id not in records.running_ids()
    assert not records.client.exists(lease_key(job_id))


def test_dead_job_is_requeued_exactly_once_by_racing_reapers(records):
    job_id = queued(records)
    records.claim(job_id, 1, "w1:1:1", 0.2)
    assert records.requeue_if_dead(job_id) == ("alive", 0)
    time.sleep(0.3)  # the lease expires: the worker stopped beating

    outcomes = []
    barrier = threading.Barrier(8)

    def reap():
        barrier.wait()
        outcomes.append(records.requeue_if_dead(job_id)[0])

    threads = [threading.Thread(target=reap) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("requeued") == 1
    record = records.get(job_id)
    assert record["state"] == "queued" and record["attempts"] == 2
    # The old attempt's message (kombu redelivery) is stale; the new one runs.
    assert records.claim(job_id, 1, "w2:1:1", 5) == "stale"
    assert records.claim(job_id, 2, "w2:1:2", 5) == "claimed"


def test_a_worker_that_lost_its_job_cannot_touch_the_record(records):
    job_id = queued(records)
    records.claim(job_id, 1, "w1:1:1", 0.1)
    time.sleep(0.2)
    records.requeue_if_dead(job_id)
    records.claim(job_id, 2, "w2:1:2", 5)
    assert records.heartbeat(job_id, "w1:1:1", 5) == 0  # the stalled worker learns it lost
    assert not records.update_owned(job_id, "w1:1:1", state="failed", error="late")
    assert records.heartbeat(job_id, "w2:1:2", 5) == 1
    assert records.get(job_id)["state"] == "running"


def test_worker_lost_too_often_fails_the_job(records):
    job_id = queued(records)
    for attempt in (1, 2, 3):
        assert records.claim(job_id, attempt, f"w:1:{attempt}", 0.05) == "claimed"
        time.sleep(0.1)
        outcome, _ = records.requeue_if_dead(job_id, max_losses=3)
    assert outcome == "failed"
    record = records.get(job_id)
    assert record["state"] == "failed" and "worker lost 3 times" in record["error"]
    assert job_id not in records.client.smembers(RUNNING_KEY)


def test_hand_backs_do_not_count_as_lost_workers(records):
    job_id = queued(records)
    for attempt in (1, 2, 3):
        records.claim(job_id, attempt, f"w:1:{attempt}", 5)
        assert records.release(job_id, f"w:1:{attempt}") == ("requeued", attempt + 1)
    records.claim(job_id, 4, "w:1:4", 0.05)
    time.sleep(0.1)
    assert records.requeue_if_dead(job_id, max_losses=3) == ("requeued", 5)
    assert records.get(job_id)["workers_lost"] == 1


def test_cancel_queued_and_running(records):
    waiting = queued(records)
    assert records.request_cancel(waiting) == "queued"
    assert records.get(waiting)["state"] == "cancelled"
    assert records.claim(waiting, 1, "w:1:1", 5) == "terminal"

    running = queued(records)
    records.claim(running, 1, "w:1:1", 5)
    assert records.heartbeat(running, "w:1:1", 5) == 1
    assert records.request_cancel(running) == "running"
    assert records.get(running)["state"] == "running"  # the worker stops it, not the CLI
    assert records.cancel_requested(running)
    assert records.heartbeat(running, "w:1:1", 5) == 2
    assert records.request_cancel(new_job_id()) == "missing"


def test_cancelled_job_whose_worker_died_is_not_requeued(records):
    job_id = queued(records)
    records.claim(job_id, 1, "w:1:1", 0.1)
    records.request_cancel(job_id)
    time.sleep(0.2)
    assert records.requeue_if_dead(job_id)[0] == "cancelled"
    assert records.get(job_id)["state"] == "cancelled"


def test_release_hands_the_job_back_for_the_next_attempt(records):
    job_id = queued(records)
    records.claim(job_id, 1, "w:1:1", 5)
    assert records.release(job_id, "someone-else") == ("not-owner", 0)
    assert records.release(job_id, "w:1:1") == ("requeued", 2)
    assert records.get(job_id)["state"] == "queued"


def test_list_is_newest_first_and_filters_by_state(records):
    ids = [queued(records) for _ in range(5)]
    records.request_cancel(ids[1])
    listed = [r["id"] for r in records.list(limit=10)]
    assert listed == sorted(ids, key=lambda i: records.client.zscore("labctl:jobs", i),
                            reverse=True)
    assert [r["id"] for r in records.list(state="cancelled")] == [ids[1]]
    assert len(records.list(limit=2)) == 2


def test_log_lines_append_in_order(records):
    job_id = queued(records)
    records.append_log(job_id, "a", "b")
    records.append_log(job_id, "c")
    assert records.read_log(job_id) == ["a", "b", "c"]
    assert records.read_log(job_id, 2) == ["c"]


def test_the_reaper_writes_the_end_it_decides_into_the_folder(records, labctl_env, tmp_path):
    # The dead worker never wrote it: without this, status.json says "running" forever.
    from labctl.shared.artifacts import ArtifactStore
    from labctl.worker.reaper import Reaper

    labctl_env(artifacts_dir=tmp_path / "art")
    job_id = queued(records)
    folder = ArtifactStore(tmp_path / "art").job(job_id).create()
    folder.update_status(state="running", epoch=8)
    assert records.claim(job_id, 1, "w:1:1", 0.05) == "claimed"
    time.sleep(0.1)
    Reaper(None, records, interval=60, max_losses=1).sweep()
    status = folder.read_status()
    assert records.get(job_id)["state"] == "failed"
    assert status["state"] == "failed" and "worker lost" in status["error"]
    assert status["epoch"] == 8  # the rest of what the runner wrote is kept


def test_mirror_end_never_overrides_an_end_the_folder_recorded(tmp_path):
    from labctl.shared.artifacts import ArtifactStore
    from labctl.shared.lifecycle import mirror_end_into_folder

    store = ArtifactStore(tmp_path)
    done = store.job(new_job_id()).create()
    done.update_status(state="succeeded")
    assert not mirror_end_into_folder(done, {"state": "failed", "error": "late reaper"})
    assert done.read_status()["state"] == "succeeded"
    assert not mirror_end_into_folder(store.job(new_job_id()), {"state": "cancelled"})  # none
    running = store.job(new_job_id()).create()
    running.update_status(state="running")
    assert not mirror_end_into_folder(running, {"state": "running"})  # nothing has ended
