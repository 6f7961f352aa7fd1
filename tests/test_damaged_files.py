"""Job files as a user finds them after a full disk, a copy cut short or a hand edit: a
checkpoint that is torn, garbage or says an impossible epoch; a torn status.json; a run
killed between two writes. Each is refused in one line before anything is written, or
survived with each epoch logged once. And disk use: a succeeded job keeps its final weights
and drops its resumable checkpoint unless LABCTL_KEEP_CHECKPOINT says otherwise."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.shared.artifacts import ArtifactStore, JobFolder, new_job_id
from labctl.shared.spec import build_spec
from labctl.shared.testing import free_port, wait_for
from labctl.worker.checkpoints import CheckpointDamaged, peek_epoch
from labctl.worker.engine import JobCancelled
from labctl.worker.runner import EPOCH_LINE, Reporter, run_job

#: Three epochs of digits in about a second.
TINY = {"model": "numpy-cnn", "dataset": "digits", "epochs": 5, "limit_train": 200,
        "limit_test": 60, "batch_size": 50}
DAMAGED = "checkpoint damaged; delete it to start over"


@pytest.fixture(autouse=True)
def settings(labctl_env, tmp_path):
    """No Redis (a port nothing listens on): these jobs are read from their folders, as any
    `labctl run` job is. Tests that set more call it again."""
    def configure(**values):
        return labctl_env(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                          artifacts_dir=tmp_path, **values)
    configure()
    return configure


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


class CancelAt(Reporter):
    """Ctrl-C as a user presses it: at the first batch of ``epoch``."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_batch(self, epoch, batch, num_batches):
        if epoch == self.epoch:
            raise JobCancelled


def cancelled_job(root: Path, after: int = 3, **spec) -> JobFolder:
    """A numpy-cnn job stopped after ``after`` epochs, resumable."""
    store, job_id = ArtifactStore(root), new_job_id()
    outcome = run_job(build_spec({**TINY, **spec}), job_id, store, CancelAt(after + 1))
    assert outcome.state == "cancelled"
    folder = store.job(job_id)
    assert [row["epoch"] for row in folder.read_metrics()] == list(range(1, after + 1))
    return folder


def edit_npz_epoch(path: Path, epoch: int) -> None:
    """What a user editing the checkpoint by hand does: load, change epoch, save."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["epoch"] = np.array(epoch, np.int64)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def snapshot(folder: JobFolder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.path.iterdir()) if p.is_file()}


def epoch_lines(folder: JobFolder) -> list[int]:
    return [int(m[1]) for line in folder.read_log() if (m := EPOCH_LINE.match(line))]


# --- a checkpoint that is not one ------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
def test_a_torn_or_garbage_npz_checkpoint_fails_the_job_in_one_line(tmp_path, damage):
    folder = cancelled_job(tmp_path)
    damage(folder.path / "checkpoint.npz")
    rows, log = folder.read_metrics(), folder.read_log()

    outcome = run_job(build_spec(TINY), folder.job_id, ArtifactStore(tmp_path))

    assert outcome.state == "failed" and outcome.failure == "input"
    assert outcome.error.startswith(DAMAGED) and str(folder.path) in outcome.error
    assert "pickle" not in outcome.error and "\n" not in outcome.error
    assert folder.read_metrics() == rows  # nothing dropped, nothing added
    assert folder.read_log() == [*log, f"failed: {outcome.error}"]
    assert folder.read_status()["error"] == outcome.error


def test_labctl_run_resume_refuses_a_damaged_checkpoint_and_writes_nothing(tmp_path):
    folder = cancelled_job(tmp_path)
    _garbage(folder.path / "checkpoint.npz")
    before = snapshot(folder)

    result = invoke("run", "--resume", folder.job_id, "--artifacts-dir", str(tmp_path))

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and DAMAGED in result.stderr
    assert "allow_pickle" not in result.output and "Traceback" not in result.output
    assert snapshot(folder) == before


@pytest.mark.parametrize("epoch, why", [(-5, "its epoch -5 is negative"),
                                        (99, "its epoch 99 is past the job's 5 epochs")])
def test_a_checkpoint_with_an_impossible_epoch_is_refused_before_anything_is_written(
        tmp_path, epoch, why):
    folder = cancelled_job(tmp_path)
    edit_npz_epoch(folder.path / "checkpoint.npz", epoch)
    before = snapshot(folder)

    # labctl run --resume: refused, the folder byte for byte as it was.
    result = invoke("run", "--resume", folder.job_id, "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert DAMAGED in result.stderr and why in result.stderr
    assert snapshot(folder) == before

    # A worker's run of it (no CLI in front): the job fails; no metrics row is lost.
    outcome = run_job(build_spec(TINY), folder.job_id, ArtifactStore(tmp_path))
    assert outcome.state == "failed" and why in outcome.error
    assert [row["epoch"] for row in folder.read_metrics()] == [1, 2, 3]
    assert epoch_lines(folder) == [1, 2, 3]


def test_a_checkpoint_of_another_kind_is_damaged_too(tmp_path):
    folder = cancelled_job(tmp_path)
    with open(folder.path / "checkpoint.npz", "wb") as f:
        np.savez(f, weights=np.zeros(3))  # a valid archive, but not ours
    outcome = run_job(build_spec(TINY), folder.job_id, ArtifactStore(tmp_path))
    assert outcome.state == "failed"
    assert outcome.error.startswith(DAMAGED) and "not a labctl.numpy-cnn.v1" in outcome.error


def test_deleting_the_damaged_checkpoint_starts_over_from_epoch_1_and_says_so(tmp_path):
    folder = cancelled_job(tmp_path)
    _truncate(folder.path / "checkpoint.npz")
    run_job(build_spec(TINY), folder.job_id, ArtifactStore(tmp_path))  # fails: damaged
    (folder.path / "checkpoint.npz").unlink()  # as the message says

    result = invoke("run", "--resume", folder.job_id, "--artifacts-dir", str(tmp_path))

    assert result.exit_code == 0, result.output
    assert "no checkpoint to resume from: starting from epoch 1" in result.stderr
    assert [row["epoch"] for row in folder.read_metrics()] == [1, 2, 3, 4, 5]
    log = folder.read_log()
    assert "no checkpoint to resume from; starting from epoch 1" in log
    assert epoch_lines(folder) == [1, 2, 3, 4, 5]  # the first run's lines are not repeated


# --- torch checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory, torch_one_thread) -> tuple[object, Path]:
    from labctl.worker.torch_engine import TorchEngine

    spec = build_spec(dict(model="resnet50", dataset="synthetic", image_size=32,
                           limit_train=8, limit_test=8, batch_size=8, epochs=3,
                           num_workers=0, device="cpu"))
    engine = TorchEngine(spec)
    path = tmp_path_factory.mktemp("torch") / "checkpoint.pt"
    engine.save_checkpoint(path, 1, spec.model_dump(mode="json"))
    return engine, path


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
def test_a_torn_or_garbage_torch_checkpoint_is_damaged(torch_checkpoint, tmp_path, damage):
    engine, good = torch_checkpoint
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(good.read_bytes())
    damage(path)
    for load in (engine.load_checkpoint, lambda p: peek_epoch(p, "resnet50")):
        with pytest.raises(CheckpointDamaged) as raised:
            load(path)
        message = str(raised.value)
        assert message.startswith(DAMAGED) and "\n" not in message
        assert "weights_only" not in message and "pickle" not in message


def test_a_torch_checkpoint_with_an_edited_epoch_is_refused(torch_checkpoint, tmp_path):
    import torch

    from labctl.worker.checkpoints import checked_epoch

    engine, good = torch_checkpoint
    state = torch.load(good, weights_only=True)
    state["epoch"] = -5
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    assert peek_epoch(path, "resnet50") == -5
    with pytest.raises(CheckpointDamaged, match="its epoch -5 is negative"):
        checked_epoch(path, engine.load_checkpoint(path), 3)
    state["epoch"] = "three"
    torch.save(state, path)
    with pytest.raises(CheckpointDamaged, match="not a whole number"):
        checked_epoch(path, engine.load_checkpoint(path), 3)


def test_labctl_run_resume_refuses_a_torn_torch_checkpoint_and_writes_nothing(
        tmp_path, torch_one_thread):
    spec = dict(model="resnet50", dataset="synthetic", image_size=32, limit_train=8,
                limit_test=8, batch_size=8, epochs=3, num_workers=0, device="cpu")
    folder = cancelled_job(tmp_path, after=1, **spec)
    _truncate(folder.path / "checkpoint.pt")
    before = snapshot(folder)

    result = invoke("run", "--resume", folder.job_id, "--artifacts-dir", str(tmp_path))

    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and DAMAGED in result.stderr
    assert "not a readable PyTorch archive" in result.stderr
    assert "weights_only" not in result.output and "Traceback" not in result.output
    assert snapshot(folder) == before


# --- status.json ------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b'{"state": "runn', b"\x00\xff\xfe garbage", b"[1, 2]",
                                     b""])
def test_status_of_a_job_with_a_damaged_status_json_is_one_line(tmp_path, content):
    folder = cancelled_job(tmp_path, after=1, epochs=2)
    folder.status_path.write_bytes(content)

    status = invoke("status", folder.job_id)
    as_json = invoke("status", folder.job_id, "--json")
    cancel = invoke("cancel", folder.job_id)
    logs = invoke("logs", folder.job_id)

    for result in (status, as_json, cancel):
        assert result.exit_code == 2, result.output
        assert result.stdout == "" and result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"labctl: job {folder.job_id}: status.json is damaged")
        assert str(folder.path) in result.stderr and "Traceback" not in result.output
    # The log is readable still: shown, with the damage said once.
    assert logs.exit_code == 0 and "epoch 1/2" in logs.stdout
    assert logs.stderr.count("\n") == 1 and "status.json is damaged" in logs.stderr


# --- log.txt ----------------------------------------------------------------------------


def test_a_run_killed_at_any_moment_resumes_with_each_epoch_logged_once(tmp_path):
    """SIGKILL wherever the run happens to be (a row written and its checkpoint not, a
    checkpoint written and its line not...), then a resume: log.txt and metrics.jsonl
    hold each epoch once."""
    spec = {**TINY, "epochs": 40, "limit_train": 300}
    args = [sys.executable, "-m", "labctl.cli.main", "run", "--artifacts-dir", str(tmp_path),
            *[f"--{key.replace('_', '-')}={value}" for key, value in spec.items()]]
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = ArtifactStore(tmp_path)
    try:
        wait_for(lambda: store.job_ids() and len(store.job(store.job_ids()[0])
                                                  .read_metrics()) >= 2, 120, interval=0.01,
                 what="two epochs")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    folder = store.job(store.job_ids()[0])
    assert len(folder.read_metrics()) < 40, "the run finished before it was killed"

    resumed = invoke("run", "--resume", folder.job_id, "--artifacts-dir", str(tmp_path))

    assert resumed.exit_code == 0, resumed.output
    assert [row["epoch"] for row in folder.read_metrics()] == list(range(1, 41))
    assert epoch_lines(folder) == list(range(1, 41))
    assert sum(line.startswith("resumed from checkpoint after epoch ")
               for line in folder.read_log()) == 1


def test_an_epoch_whose_line_was_never_written_gets_it_on_resume(tmp_path):
    # Killed after epoch 3's checkpoint, before its log line: the resume starts after 3.
    folder = cancelled_job(tmp_path)
    folder.replace_log([line for line in folder.read_log() if not line.startswith("epoch 3/")])
    outcome = run_job(build_spec(TINY), folder.job_id, ArtifactStore(tmp_path))
    assert outcome.state == "succeeded", outcome.error
    assert sorted(epoch_lines(folder)) == [1, 2, 3, 4, 5]
    assert len(epoch_lines(folder)) == 5


def _limit_file_size(limit: int):
    def apply() -> None:
        # A disk that fills up: writes past `limit` bytes fail (EFBIG), as ENOSPC does once
        # the disk is full; small appends (log lines) still fit, as they often do.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_one_line_in_the_job_log_not_tracebacks(tmp_path):
    """The checkpoint (about 100 kB) cannot be written, everything else can."""
    args = [sys.executable, "-m", "labctl.cli.main", "run", "--artifacts-dir", str(tmp_path),
            *[f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(16_384))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("File too large") == 1

    (job_id,) = ArtifactStore(tmp_path).job_ids()
    folder = ArtifactStore(tmp_path).job(job_id)
    log = folder.read_log()
    assert log == [f"failed: {folder.read_status()['error']}"]
    assert log[0].startswith("failed: OSError: [Errno 27] File too large")
    # The traceback is kept for whoever debugs it, beside the log, not in it.
    assert "Traceback" in (folder.path / "traceback.txt").read_text()
    assert folder.read_status()["state"] == "failed"
    assert not list(folder.path.glob(".checkpoint.npz.*"))  # no half-written temp file


def test_a_log_that_cannot_be_written_still_ends_the_job(tmp_path):
    folder = ArtifactStore(tmp_path).job(new_job_id()).create()
    folder.log_path.symlink_to("/dev/full")  # every append: ENOSPC
    outcome = run_job(build_spec(TINY), folder.job_id, ArtifactStore(tmp_path))
    assert outcome.state == "failed" and outcome.failure == "crash"
    assert outcome.error == "OSError: [Errno 28] No space left on device"
    assert folder.read_status()["state"] == "failed"


# --- disk: a succeeded job's checkpoint -------------------------------------------------


def _succeeded(tmp_path: Path) -> JobFolder:
    args = [f"--{key.replace('_', '-')}={value}" for key, value in {**TINY, "epochs": 2}.items()]
    result = invoke("run", *args, "--artifacts-dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    return ArtifactStore(tmp_path).job(json.loads(result.stdout)["job_id"])


def test_a_succeeded_job_keeps_its_weights_and_drops_its_checkpoint(tmp_path):
    folder = _succeeded(tmp_path)
    assert (folder.path / "model.npz").exists()
    assert not (folder.path / "checkpoint.npz").exists()
    assert folder.read_status()["state"] == "succeeded"
    # What reads a finished job reads its metrics, summary and weights, never the checkpoint.
    compare = invoke("compare", folder.job_id, "--artifacts-dir", str(tmp_path))
    assert compare.exit_code == 0, compare.output
    report = invoke("report", folder.job_id, "-o", str(tmp_path / "report"),
                    "--artifacts-dir", str(tmp_path))
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "report.md").exists()


def test_resuming_a_succeeded_job_without_its_checkpoint_says_why_and_writes_nothing(
        tmp_path):
    folder = _succeeded(tmp_path)
    before = snapshot(folder)
    for flags in ([], ["--epochs", "4"]):
        result = invoke("run", "--resume", folder.job_id, *flags,
                        "--artifacts-dir", str(tmp_path))
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1
        assert "succeeded and its checkpoint was removed" in result.stderr
        assert "LABCTL_KEEP_CHECKPOINT=1" in result.stderr
        assert str(folder.path / "model.npz") in result.stderr
    assert snapshot(folder) == before


@pytest.mark.parametrize("value", ["1", "true"])
def test_labctl_keep_checkpoint_keeps_it_and_the_job_trains_further(tmp_path, settings,
                                                                     value):
    settings(keep_checkpoint=value)
    folder = _succeeded(tmp_path)
    assert (folder.path / "checkpoint.npz").exists() and (folder.path / "model.npz").exists()
    longer = invoke("run", "--resume", folder.job_id, "--epochs", "3",
                    "--artifacts-dir", str(tmp_path))
    assert longer.exit_code == 0, longer.output
    assert [row["epoch"] for row in folder.read_metrics()] == [1, 2, 3]
    assert epoch_lines(folder) == [1, 2, 3]


@pytest.mark.integration
@pytest.mark.parametrize("keep", [None, "1"])
def test_a_worker_drops_a_succeeded_jobs_checkpoint_unless_told_to_keep_it(
        redis_server, tmp_path, keep):
    from labctl.shared.jobstate import TERMINAL_STATES
    from labctl.shared.queue import submit_job
    from labctl.shared.records import JobRecords
    from labctl.shared.testing import WorkerProcess
    from labctl.worker.app import make_app

    env = {"LABCTL_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    if keep:
        env["LABCTL_KEEP_CHECKPOINT"] = keep
    records = JobRecords.from_url(redis_server.url)
    with WorkerProcess(redis_server.url, tmp_path / "w1.log", env=env):
        job_id = submit_job(build_spec({**TINY, "epochs": 2}), records=records,
                            app=make_app(redis_server.url))
        wait_for(lambda: records.state(job_id) in TERMINAL_STATES, 120, interval=0.1,
                 what="the job to end")
    assert records.get(job_id)["state"] == "succeeded", records.get(job_id)["error"]
    folder = ArtifactStore(tmp_path / "artifacts").job(job_id)
    assert (folder.path / "model.npz").exists()
    assert (folder.path / "checkpoint.npz").exists() == bool(keep)
