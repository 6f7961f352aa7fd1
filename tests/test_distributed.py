"""Data-parallel ResNet50 jobs (``devices > 1``) with gloo ranks on this CPU: the same
results as one device, a killed rank handed back and resumed, a cancel that ends every
rank, and the refusals (spec, capacity, an artefacts folder not shared between workers).

ResNet50 at 32 px on digits: a batch of 16 takes about a second on one core, so the jobs
here are a few hundred images; each 2-rank job also pays for two interpreters importing
torch.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.shared import lifecycle
from labctl.shared.artifacts import ArtifactStore
from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import submit_job
from labctl.shared.records import MAX_WORKER_LOSSES, JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import (
    RedisServer,
    WorkerProcess,
    pid_alive,
    spawned_children,
    stop_all,
    wait_for,
)
from labctl.worker.app import make_app
from labctl.worker.ddp_launcher import DistributedEngine
from labctl.worker.engine import RankLost
from labctl.worker.runner import run_job

RESNET = {"model": "resnet50", "dataset": "digits", "image_size": 32, "batch_size": 16,
          "lr_schedule": "constant", "num_workers": 0, "device": "cpu"}
NUMPY = {"model": "numpy-cnn", "dataset": "digits", "batch_size": 16, "limit_test": 128,
         "num_workers": 0}


def epochs_of(folder) -> list[int]:
    return [row["epoch"] for row in folder.read_metrics()]


# --- the spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "numpy-cnn", "--devices", "2"],
     "devices: numpy-cnn trains in one process; devices > 1 applies to resnet50 only"),
    (["--devices", "2", "--batch-size", "15"],
     "batch_size: 15 is the global batch and must split evenly over 2 devices"),
    (["--devices", "2", "--device", "cuda:1"], "device: cuda:1 names one GPU"),
    (["--devices", "0"], "devices: Input should be greater than or equal to 1"),
    (["--dataset", "stanford-cars", "--devices", "2", "--data-path", "cache"],
     "data_path: a data-parallel job streams its photos"),
])
def test_a_spec_that_cannot_run_data_parallel_is_one_line_and_exit_2(tmp_path, flags, message):
    result = CliRunner().invoke(cli, ["run", "--dataset", "digits", "--artifacts-dir",
                                      str(tmp_path), *flags])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labctl: ") and message in lines[0]
    assert not any(tmp_path.iterdir())  # refused before any folder was made


# --- training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_device_and_resume_on_one(tmp_path, torch_one_thread):
    store = ArtifactStore(tmp_path)
    # An odd test split: DistributedSampler would pad it with a repeated image.
    spec = dict(RESNET, limit_train=192, limit_test=101, epochs=3)
    single = run_job(build_spec(spec), "20260101-000000-000001", store)
    double = run_job(build_spec({**spec, "devices": 2}), "20260101-000000-000002", store,
                     keep_checkpoint=True)
    assert single.state == "succeeded", single.error
    assert double.state == "succeeded", double.error

    folder = store.job("20260101-000000-000002")
    assert epochs_of(folder) == [1, 2, 3]
    summary = folder.read_summary()
    assert summary["devices"] == 2 and store.job("20260101-000000-000001").read_summary()[
        "devices"] == 1
    # The whole test split, each image once: the confusion matrix counts 101 images and
    # its rows are the split's own labels.
    cm = np.load(folder.path / "confusion_matrix.npy")
    assert cm.sum() == 101
    single_cm = np.load(store.job("20260101-000000-000001").path / "confusion_matrix.npy")
    assert (cm.sum(axis=1) == single_cm.sum(axis=1)).all()
    rows = folder.read_metrics()
    assert all(row["images_per_second"] > 0 for row in rows)
    # Same initial weights, global batch and learning rate: the same start, up to the order
    # of the images and BatchNorm seeing half batches. Later epochs drift apart, by how much
    # depends on the machine's arithmetic (final test accuracy 0.72 vs 0.32 on one machine,
    # within 0.1 on another), so the check is that both learn, not that they end alike.
    single_rows = store.job("20260101-000000-000001").read_metrics()
    assert rows[0]["train_loss"] == pytest.approx(single_rows[0]["train_loss"], rel=0.1)
    for losses in ([r["train_loss"] for r in rows], [r["train_loss"] for r in single_rows]):
        assert losses[-1] < 0.6 * losses[0], losses
    assert double.summary["final"]["test_accuracy"] > 0.2  # chance is 0.1

    # The checkpoint is the plain module's: a one-device run resumes it, each epoch once.
    resumed = run_job(build_spec({**spec, "devices": 1, "epochs": 4}),
                      "20260101-000000-000002", store)
    assert resumed.state == "succeeded", resumed.error
    assert epochs_of(folder) == [1, 2, 3, 4]
    assert "resumed from checkpoint after epoch 3" in folder.read_log()
    assert folder.read_summary()["devices"] == 1


# --- through the queue -----------------------------------------------------------------------


def worker_env(tmp_path: Path, *, artifacts: str = "artifacts", timeout: float = 20) -> dict:
    """``timeout``: the lease. Long by default: a worker importing torch on a loaded machine
    (its C extension holds the GIL for seconds) must not lose its first job's lease."""
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"LABCTL_ARTIFACTS_DIR": str(tmp_path / artifacts),
            "LABCTL_DATA_DIR": str(tmp_path / "data"),
            "LABCTL_HEARTBEAT_SECONDS": "0.5", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": str(timeout),
            # A peer that hangs fails the collective in seconds here, not minutes.
            "LABCTL_DISTRIBUTED_TIMEOUT_SECONDS": "60"}


def submit(server: RedisServer, records: JobRecords, **values) -> str:
    return submit_job(build_spec(values), records=records, app=make_app(server.url))


def wait_end(records: JobRecords, job_id: str, timeout: float) -> dict:
    wait_for(lambda: records.state(job_id) in TERMINAL_STATES, timeout, interval=0.2,
             what=f"job {job_id} to end")
    return records.get(job_id)


def wait_for_ranks(worker: WorkerProcess, count: int) -> list[int]:
    return wait_for(lambda: len(pids := spawned_children(worker.pid)) == count and pids,
                    120, interval=0.2, what=f"{count} ranks under worker {worker.name}")


def test_a_rank_killed_between_calls_is_reported_as_lost_not_as_a_broken_pipe(tmp_path):
    # Killed after its last answer, a rank is not there to take the next command: the send
    # to its pipe fails. That is the rank's death (the job is handed back), not the job's
    # own BrokenPipeError (the job would fail).
    engine = DistributedEngine(build_spec(dict(RESNET, devices=2, limit_train=32,
                                               limit_test=16, epochs=1)))
    try:
        os.kill(engine.pids[1], signal.SIGKILL)
        wait_for(lambda: not engine.ranks[1].is_alive(), 30, what="rank 1 to die")
        with pytest.raises(RankLost, match="rank 1 of 2 was killed by SIGKILL"):
            engine.evaluate()
    finally:
        engine.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_rank_hands_the_job_back_and_it_resumes_each_epoch_once(redis_server,
                                                                         tmp_path):
    env = worker_env(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    with WorkerProcess(redis_server.url, tmp_path / "w1.log", env=env) as worker:
        # Six epochs of a second or so each on a fast machine: the kill lands mid-job.
        job_id = submit(redis_server, records, **RESNET, devices=2, epochs=6, limit_train=64,
                        limit_test=32)
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 300, interval=0.1,
                 what="the first epoch")
        ranks = wait_for_ranks(worker, 2)
        time.sleep(0.5)  # into the second epoch's batches
        killed_after = records.get(job_id)["epoch"]
        os.kill(ranks[1], signal.SIGKILL)
        assert killed_after < 5, "the job nearly finished before a rank could be killed"
        record = wait_end(records, job_id, timeout=400)

    assert record["state"] == "succeeded", record["error"]
    assert record["attempts"] == 2  # handed back once, by the rank's death
    folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id)
    assert epochs_of(folder) == [1, 2, 3, 4, 5, 6]
    assert any("rank 1 of 2 was killed by SIGKILL; the job stops and goes back to the queue"
               in line for line in folder.read_log())
    log = records.read_log(job_id)
    assert "requeued as attempt 2" in log
    resumed = [line for line in log if line.startswith("resumed from checkpoint after epoch")]
    # At or after the epoch read before the kill: the next one may checkpoint in between.
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= killed_after
    assert worker.alive() or "Traceback" not in worker.log_text()


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_whose_rank_is_killed_at_every_attempt_fails_after_the_maximum(redis_server,
                                                                              tmp_path):
    # An OOM kill that recurs (a batch too large for the host) must not requeue forever.
    env = worker_env(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    killed: set[int] = set()
    with WorkerProcess(redis_server.url, tmp_path / "w1.log", env=env) as worker:
        job_id = submit(redis_server, records, **RESNET, devices=2, epochs=50,
                        limit_train=64, limit_test=32)
        for attempt in range(1, MAX_WORKER_LOSSES + 1):
            wait_for(lambda a=attempt: records.get(job_id)["attempts"] == a
                     and records.get(job_id)["state"] == "running", 120, interval=0.1,
                     what=f"attempt {attempt} to run")
            ranks = wait_for(lambda: len(p := set(spawned_children(worker.pid)) - killed) == 2
                             and sorted(p), 120, interval=0.2, what="this attempt's ranks")
            os.kill(ranks[1], signal.SIGKILL)
            killed.update(ranks)
        record = wait_end(records, job_id, timeout=120)
        assert worker.alive()
    assert record["state"] == "failed", record
    assert record["attempts"] == MAX_WORKER_LOSSES
    assert record["error"].startswith(
        f"lost a process of the job {MAX_WORKER_LOSSES} times (last: rank ")
    assert "killed by SIGKILL); not retrying" in record["error"]
    folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id)
    assert folder.read_status()["state"] == "failed"


@pytest.mark.integration
@pytest.mark.slow
def test_cancel_ends_every_rank_and_keeps_the_checkpoint(redis_server, tmp_path):
    env = worker_env(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    with WorkerProcess(redis_server.url, tmp_path / "w1.log", env=env) as worker:
        job_id = submit(redis_server, records, **RESNET, devices=2, epochs=20, limit_train=64,
                        limit_test=16)
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 300, interval=0.1,
                 what="the first epoch")
        ranks = wait_for_ranks(worker, 2)
        assert lifecycle.cancel(records, job_id) == "running"
        # Each rank checks the stop before its next batch: gone within seconds.
        wait_for(lambda: not any(pid_alive(pid) for pid in ranks), 30, interval=0.1,
                 what="both ranks to exit")
        record = wait_end(records, job_id, timeout=30)
        assert worker.alive()  # the worker lives on for the next job

    assert record["state"] == "cancelled"
    folder = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id)
    assert (folder.path / "checkpoint.pt").exists()
    assert folder.read_status()["state"] == "cancelled"
    assert epochs_of(folder) == list(range(1, record["epoch"] + 1))


@pytest.mark.integration
def test_a_resume_that_finds_no_checkpoint_says_the_artefacts_are_not_shared(redis_server,
                                                                             tmp_path):
    records = JobRecords.from_url(redis_server.url)
    first = WorkerProcess(redis_server.url, tmp_path / "w1.log", name="w1",
                          env=worker_env(tmp_path, artifacts="host-a", timeout=3))
    # Another host's worker: its own artefacts directory, not the first one's.
    second = WorkerProcess(redis_server.url, tmp_path / "w2.log", name="w2",
                           env=worker_env(tmp_path, artifacts="host-b", timeout=3))
    try:
        first.start().wait_ready()
        job_id = submit(redis_server, records, **NUMPY, epochs=40)
        wait_for(lambda: (records.get(job_id)["epoch"] or 0) >= 1, 120, interval=0.02,
                 what="the first epoch checkpoint")
        first.kill()
        second.start().wait_ready()
        record = wait_end(records, job_id, timeout=120)
    finally:
        stop_all([first, second])

    # On a loaded machine the first worker may also lose a lease once before it is killed.
    assert record["state"] == "failed" and record["attempts"] >= 2
    assert record["worker"] == second.hostname
    assert "the artefacts directory is not shared between workers" in record["error"]
    assert "LABCTL_ARTIFACTS_DIR" in record["error"]
    assert not ArtifactStore(tmp_path / "host-b").job(job_id).exists()  # nothing restarted
    assert any("not shared between workers" in line for line in records.read_log(job_id))


@pytest.mark.integration
def test_a_job_asking_for_more_devices_than_any_worker_has_is_refused(redis_server, tmp_path,
                                                                      labctl_env):
    env = worker_env(tmp_path)
    records = JobRecords.from_url(redis_server.url)
    labctl_env(redis_url=redis_server.url)
    cpus = os.cpu_count() or 1
    with WorkerProcess(redis_server.url, tmp_path / "w1.log", env=env) as worker:
        # The name's reservation comes first; the reaper's first round adds the capacity.
        announced = wait_for(lambda: [w for w in records.live_workers()
                                      if w["name"] == worker.hostname and "cpus" in w], 30,
                             what="the worker's presence key with its capacity")[0]
        assert announced["cpus"] == cpus and announced["gpus"] == 0
        too_many = str(2 * cpus if cpus % 2 == 0 else 2 * cpus + 2)
        result = CliRunner().invoke(cli, ["submit", *spec_flags(RESNET), "--devices", too_many,
                                          "--limit-train", "32", "--epochs", "1"])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            f"labctl: devices: {too_many} requested, but the live workers of the cpu queue "
            f"have at most {cpus} CPUs each (a job runs on one worker)")
        assert not records.client.keys("labctl:job:*")  # nothing was queued

        # A job the submit could not judge (sent without the check) fails with the reason.
        job_id = submit(redis_server, records, **RESNET, devices=int(too_many), epochs=1,
                        limit_train=32)
        record = wait_end(records, job_id, timeout=60)
    assert record["state"] == "failed"
    assert f"devices: {too_many} requested but worker {worker.hostname} has {cpus} CPUs" \
        in record["error"]


def spec_flags(values: dict) -> list[str]:
    return [item for key, value in values.items()
            for item in (f"--{key.replace('_', '-')}", str(value))]


def test_submit_judges_capacity_only_when_every_worker_of_the_queue_announced_it():
    from labctl.shared.queue import capacity_problem

    spec = build_spec({**RESNET, "devices": 4})  # device cpu: the cpu queue
    small = {"name": "a", "queues": ["cpu"], "gpus": 0, "cpus": 2}
    big = {"name": "b", "queues": ["cpu"], "gpus": 0, "cpus": 8}
    elsewhere = {"name": "c", "queues": ["gpu"], "gpus": 8, "cpus": 64}
    older = {"name": "d", "queues": ["cpu"]}  # a worker that announces no capacity
    assert capacity_problem(spec, "cpu", [small, elsewhere]).startswith(
        "devices: 4 requested, but the live workers of the cpu queue have at most 2 CPUs")
    assert capacity_problem(spec, "cpu", [small, big]) is None
    assert capacity_problem(spec, "cpu", [small, older]) is None
    assert capacity_problem(spec, "cpu", []) is None  # none yet: it may come
    gpu_spec = build_spec({**RESNET, "device": "cuda", "devices": 4})
    assert "at most 2 GPUs" in capacity_problem(
        gpu_spec, "gpu", [{"name": "e", "queues": ["gpu"], "gpus": 2, "cpus": 64}])
    # auto takes a worker's GPUs if it has any, else its CPUs.
    auto = build_spec({**RESNET, "device": "auto", "devices": 4})
    assert capacity_problem(auto, "gpu", [{"name": "f", "queues": ["gpu"], "gpus": 0,
                                           "cpus": 4}]) is None


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_nccl_ranks_train_and_evaluate_the_whole_test_split():
    """scripts/gpu-check: as many NCCL ranks as visible GPUs (one is DDP's 1-rank path)."""
    import torch

    from labctl.worker.ddp_launcher import DistributedEngine

    ranks = torch.cuda.device_count()
    engine = DistributedEngine(build_spec({**RESNET, "device": "cuda", "devices": ranks,
                                           "batch_size": 16 * ranks, "limit_train": 256,
                                           "limit_test": 101, "epochs": 1, "amp": True}))
    try:
        trained = engine.train_one_epoch(1, lambda batch, batches: None)
        evaluated = engine.evaluate()
    finally:
        engine.close()
    assert trained.images == 256 and np.isfinite(trained.loss)
    assert len(evaluated.y_true) == 101  # every test image once, whatever the rank count
    assert all(not pid_alive(pid) for pid in engine.pids)


@pytest.mark.parametrize(("flags", "message"), [
    (["--gpus", "a,b"], "labctl: --gpus: expected GPU indices such as 0,1,2,3, got 'a,b'"),
    (["--gpus", "0,0"], "labctl: --gpus: GPU listed twice in '0,0'"),
    (["--gpus", "0,1", "--concurrency", "2"],
     "labctl: --gpus gives one worker several GPUs; use it with --concurrency 1 (or one "
     "worker per GPU: --concurrency N without --gpus)"),
])
def test_worker_gpus_that_cannot_work_are_one_line_and_exit_2(flags, message):
    result = CliRunner().invoke(cli, ["worker", *flags])
    assert result.exit_code == 2 and result.stderr.strip() == message
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "0,1"
