"""The job vocabulary in shared/jobstate.py matches what the runner and the records write."""

from __future__ import annotations

import json
import typing

from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.jobstate import (
    STATES,
    TERMINAL_STATES,
    EpochRow,
    JobRecord,
    JobState,
    Summary,
    is_terminal,
)
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.worker.runner import run_job

SPEC = build_spec({"model": "numpy-cnn", "dataset": "digits", "epochs": 1,
                   "limit_train": 64, "limit_test": 32, "batch_size": 32})


def keys(typed: type) -> set[str]:
    return set(typing.get_type_hints(typed))


def test_states_and_terminal_states():
    assert [str(s) for s in STATES] == ["queued", "running", "succeeded", "failed",
                                        "cancelled"]
    assert {s for s in STATES if is_terminal(s)} == TERMINAL_STATES
    assert is_terminal("failed") and not is_terminal("running") and not is_terminal(None)
    assert json.dumps(JobState.CANCELLED) == '"cancelled"'  # stored in records as plain JSON


def test_the_row_and_summary_written_by_a_run_have_the_declared_keys(tmp_path):
    store = ArtifactStore(tmp_path)
    outcome = run_job(SPEC, new_job_id(), store)
    assert outcome.state == "succeeded"
    folder = store.job(outcome.job_id)
    (row,) = folder.read_metrics()
    assert set(row) <= keys(EpochRow)
    assert keys(EpochRow) - set(row) <= {"test_top5_accuracy"}  # digits has 10 classes
    assert set(json.loads(folder.summary_path.read_text())) == keys(Summary)


def test_a_new_record_has_the_declared_keys(redis_server):
    records = JobRecords.from_url(redis_server.url)
    job_id = new_job_id()
    records.create(job_id, SPEC, "cpu")
    assert set(records.get(job_id)) == keys(JobRecord)
