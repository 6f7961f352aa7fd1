"""The artefact store: ids, traversal, atomic writes, resume truncation."""

from __future__ import annotations

import json
import os
import stat

import pytest

from labctl.shared.artifacts import (
    ArtifactStore,
    InvalidJobId,
    atomic_path,
    new_job_id,
    read_jsonl,
    validate_job_id,
    write_json,
)


def test_job_ids_sort_by_time_and_validate():
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [new_job_id(t0 + timedelta(seconds=s)) for s in (0, 1, 3600)]
    assert ids == sorted(ids)
    for job_id in ids:
        assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize("bad", ["../etc", "20260101-000000-ABCDEF", "", "a/b",
                                 "20260101-000000-abcdef/..", "20260101-000000-abcdeg"])
def test_traversal_and_junk_ids_are_refused(tmp_path, bad):
    with pytest.raises(InvalidJobId):
        ArtifactStore(tmp_path).job(bad)


def test_atomic_write_leaves_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "status.json"
    write_json(target, {"state": "running"})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"state": "running"}
    assert os.listdir(tmp_path) == ["status.json"]  # no temp debris


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


def test_resume_keeps_each_epoch_once(tmp_path):
    folder = ArtifactStore(tmp_path).job(new_job_id()).create()
    for epoch in (1, 2, 3, 2, 3):  # a crash after epoch 3's row, checkpoint at 2
        folder.append_metrics({"epoch": epoch, "v": epoch})
    folder.keep_metrics_through(2)
    assert [r["epoch"] for r in folder.read_metrics()] == [1, 2]


def test_store_lists_only_job_folders(tmp_path):
    store = ArtifactStore(tmp_path)
    a, b = new_job_id(), new_job_id()
    store.job(b).create()
    store.job(a).create()
    (tmp_path / "sweeps").mkdir()
    assert store.job_ids() == sorted([a, b])


def test_status_updates_merge(tmp_path):
    folder = ArtifactStore(tmp_path).job(new_job_id()).create()
    folder.update_status(state="running", epoch=0)
    folder.update_status(epoch=2)
    assert folder.read_status() == {"id": folder.job_id, "state": "running", "epoch": 2}


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    # mkstemp's 0600 would lock other users of a shared artefacts volume out.
    (tmp_path / "plain.txt").write_text("x")
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    write_json(tmp_path / "status.json", {"state": "running"})
    with atomic_path(tmp_path / "checkpoint.npz") as tmp:
        tmp.write_bytes(b"data")
    for name in ("status.json", "checkpoint.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
