"""shared/lifecycle.py is the one owner of a job's state: nothing else writes one, and its
transitions settle the two stores by one rule (against a real private redis-server)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from labctl.shared import lifecycle
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.jobstate import JobState
from labctl.shared.lifecycle import Beat, Claim
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec

REPO = Path(__file__).resolve().parents[1]
OWNER = REPO / "shared" / "lifecycle.py"
SPEC = build_spec({"model": "numpy-cnn", "dataset": "digits", "epochs": 3})

#: The methods that change a job record (shared/records.py) or its folder's status.json
#: (shared/artifacts.py). Names also used for other things (a metric series' release) count
#: only when called on something named like a records client.
STATE_WRITERS = {"update_owned", "update_status", "fail_unclaimed", "requeue_if_dead",
                 "request_cancel"}
RECORD_WRITERS = {"create", "claim", "heartbeat", "release", "restore"}


def state_writes(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, receiver = node.func.attr, ast.unparse(node.func.value)
        if name in STATE_WRITERS or (name in RECORD_WRITERS and receiver.endswith("records")):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {receiver}.{name}")
    return found


def test_only_the_lifecycle_module_writes_a_job_state():
    shipped = [p for folder in ("cli", "worker", "shared", "bench")
               for p in sorted((REPO / folder).rglob("*.py")) if p != OWNER]
    assert [hit for path in shipped for hit in state_writes(path)] == []
    # The scan sees what it looks for: the owner itself makes every kind of write.
    seen = {hit.rsplit(".", 1)[1] for hit in state_writes(OWNER)}
    assert seen == STATE_WRITERS | RECORD_WRITERS


def test_progress_is_never_a_state_change(tmp_path):
    folder = ArtifactStore(tmp_path).job(new_job_id()).create()
    with pytest.raises(ValueError):
        lifecycle.run_progress(folder, state="succeeded")
    with pytest.raises(ValueError):
        lifecycle.run_ended(folder, JobState.RUNNING, None, run_seconds=1.0)
    with pytest.raises(ValueError):
        lifecycle.progress(None, "j", "owner", state="failed")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lifecycle.ended(None, "j", "owner", JobState.QUEUED)  # type: ignore[arg-type]


def test_a_run_marks_its_folder_running_then_ended(tmp_path):
    folder = ArtifactStore(tmp_path).job(new_job_id())
    before = lifecycle.run_started(folder, SPEC, {"worker": "w1"})
    assert before == {}
    assert folder.read_spec()["epochs"] == 3
    lifecycle.run_progress(folder, epoch=2, run_seconds=4.0)
    lifecycle.run_ended(folder, JobState.CANCELLED, "cancelled by the user", run_seconds=5.0)
    status = folder.read_status()
    assert status["state"] == "cancelled" and status["epoch"] == 2
    assert status["worker"] == "w1" and status["finished_at"] and status["started_at"]
    # A resumed run keeps the first start and clears the previous end.
    again = lifecycle.run_started(folder, SPEC)
    assert again["state"] == "cancelled"
    status = folder.read_status()
    assert status["state"] == "running" and status["finished_at"] is None
    assert status["started_at"] == again["started_at"]


@pytest.mark.integration
class TestTransitionsAgainstRedis:
    @pytest.fixture
    def records(self, redis_server) -> JobRecords:
        return JobRecords.from_url(redis_server.url)

    @pytest.fixture
    def store(self, tmp_path) -> ArtifactStore:
        return ArtifactStore(tmp_path / "art")

    def queued(self, records) -> str:
        job_id = new_job_id()
        lifecycle.queued(records, job_id, SPEC, "cpu")
        return job_id

    def test_a_job_from_queued_to_succeeded(self, records, store):
        job_id = self.queued(records)
        assert lifecycle.claim(records, store, job_id, 1, "w:1:1", lease_seconds=30,
                               worker="w") is Claim.CLAIMED
        record = records.get(job_id)
        assert record["state"] == "running" and record["worker"] == "w"
        assert record["artifacts"] == str(store.job(job_id).path.resolve())
        assert records.read_log(job_id) == ["attempt 1 started on w"]
        assert lifecycle.heartbeat(records, job_id, "w:1:1", 30) is Beat.ALIVE
        assert lifecycle.progress(records, job_id, "w:1:1", epoch=1)
        assert lifecycle.ended(records, job_id, "w:1:1", JobState.SUCCEEDED,
                               summary={"final": {"test_accuracy": 0.9}, "best": {},
                                        "dataset": "digits"})
        record = records.get(job_id)
        assert record["state"] == "succeeded" and record["epoch"] == 1
        assert record["summary"] == {"final": {"test_accuracy": 0.9}, "best": {}}
        assert records.running_ids() == []
        # A second message for the same attempt is a no-op.
        assert lifecycle.claim(records, store, job_id, 1, "w2:1:1", lease_seconds=30,
                               worker="w2") is Claim.TERMINAL

    def test_an_end_only_the_folder_saw_wins_at_the_next_claim(self, records, store):
        job_id = self.queued(records)
        lifecycle.claim(records, store, job_id, 1, "w:1:1", lease_seconds=30, worker="w")
        folder = store.job(job_id)
        lifecycle.run_started(folder, SPEC)
        lifecycle.run_ended(folder, JobState.SUCCEEDED, None, run_seconds=3.0)
        # Redis never heard of the end; the worker's hand-back requeues the job.
        assert lifecycle.hand_back(records, store, job_id, "w:1:1") == ("requeued", 2)
        assert lifecycle.claim(records, store, job_id, 2, "w:1:2", lease_seconds=30,
                               worker="w") is Claim.ENDED
        assert records.get(job_id)["state"] == "succeeded"
        assert folder.read_status()["state"] == "succeeded"

    def test_an_end_only_the_record_saw_is_mirrored_into_the_folder(self, records, store):
        job_id = self.queued(records)
        lifecycle.claim(records, store, job_id, 1, "w:1:1", lease_seconds=0.05, worker="w")
        folder = store.job(job_id)
        lifecycle.run_started(folder, SPEC)
        time.sleep(0.1)  # the lease lapses: the worker is dead
        assert lifecycle.reap(records, store, job_id, max_losses=1).outcome == "failed"
        status = folder.read_status()
        assert status["state"] == "failed" and "worker lost" in status["error"]

    def test_a_process_lost_at_each_attempt_fails_the_job_after_the_maximum(self, records,
                                                                              store):
        # A killed rank comes back through its worker's hand-back, not the reaper, and
        # counts like a lost worker; shutdowns in between do not count.
        job_id = self.queued(records)
        folder = store.job(job_id)
        lifecycle.claim(records, store, job_id, 1, "w:1:1", lease_seconds=30, worker="w")
        lifecycle.run_started(folder, SPEC)
        assert lifecycle.hand_back(records, store, job_id, "w:1:1", max_losses=2,
                                   loss="rank 1 of 2 was killed by SIGKILL") == ("requeued", 2)
        lifecycle.claim(records, store, job_id, 2, "w:1:2", lease_seconds=30, worker="w")
        assert lifecycle.hand_back(records, store, job_id, "w:1:2",
                                   max_losses=2) == ("requeued", 3)  # a shutdown
        lifecycle.claim(records, store, job_id, 3, "w:1:3", lease_seconds=30, worker="w")
        back = lifecycle.hand_back(records, store, job_id, "w:1:3", max_losses=2,
                                   loss='rank 0 of 2 exited with code 1 and "no" error')
        assert back.outcome == "failed"
        record = records.get(job_id)
        assert record["state"] == "failed" and records.running_ids() == []
        assert record["error"] == ('lost a process of the job 2 times (last: rank 0 of 2 '
                                   'exited with code 1 and "no" error); not retrying')
        assert folder.read_status()["state"] == "failed"
        assert folder.read_status()["error"] == record["error"]

    def test_a_job_cancelled_while_requeued_ends_cancelled_in_both(self, records, store):
        job_id = self.queued(records)
        lifecycle.claim(records, store, job_id, 1, "w:1:1", lease_seconds=30, worker="w")
        folder = store.job(job_id)
        lifecycle.run_started(folder, SPEC)
        assert lifecycle.hand_back(records, store, job_id, "w:1:1").attempt == 2
        assert lifecycle.cancel(records, job_id) == "queued"
        assert lifecycle.claim(records, store, job_id, 2, "w:1:2", lease_seconds=30,
                               worker="w") is Claim.TERMINAL
        assert folder.read_status()["state"] == "cancelled"

    def test_a_lost_owner_changes_nothing(self, records, store):
        job_id = self.queued(records)
        lifecycle.claim(records, store, job_id, 1, "w:1:1", lease_seconds=30, worker="w")
        assert lifecycle.heartbeat(records, job_id, "other:1:1", 30) is Beat.LOST
        assert not lifecycle.progress(records, job_id, "other:1:1", epoch=3)
        assert not lifecycle.ended(records, job_id, "other:1:1", JobState.FAILED, error="x")
        assert records.get(job_id)["state"] == "running"
        assert lifecycle.cancel(records, job_id) == "running"
        assert lifecycle.heartbeat(records, job_id, "w:1:1", 30) is Beat.CANCEL_REQUESTED
