"""The one Celery task: claim the job, then hand it to ``labctl.worker.runner.run_job``.

Thin on purpose: the runner owns training and the artefact folder, ``shared.lifecycle``
every change of the job's state. This module only checks the message, claims the job and
wires the reporters. Every decision not to run a message is logged and the message acked, so a
redelivered, duplicated or malformed message can never run a job twice or stop the worker.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from celery.exceptions import Reject

from labctl.shared import lifecycle
from labctl.shared.artifacts import ArtifactStore, InvalidJobId, validate_job_id
from labctl.shared.jobstate import JobState
from labctl.shared.lifecycle import Claim
from labctl.shared.queue import usable_devices
from labctl.shared.records import JobRecords
from labctl.shared.settings import get_settings
from labctl.shared.spec import FILE_DATASETS, JobSpec, SpecError, build_spec
from labctl.worker.app import TASK_NAME, app
from labctl.worker.capacity import worker_capacity
from labctl.worker.checkpoints import checkpoint_path
from labctl.worker.engine import RankLost
from labctl.worker.queue_reporter import (
    GuardedReporter,
    JobReleased,
    QueueReporter,
    shutting_down,
)
from labctl.worker.reaper import Heartbeat, send_job, worker_records
from labctl.worker.runner import Reporter, Reporters, run_job

log = logging.getLogger(__name__)

#: The job this process is training, if any (one per process: concurrency 1).
_running_job: str | None = None


def cancel_running_job() -> str | None:
    """Cancel the job this process is training, as ``labctl cancel`` does (it ends at its
    next batch); returns its id, or None when none runs. For the pool's terminate."""
    job_id = _running_job
    if job_id is not None:
        lifecycle.cancel(worker_records(), job_id,
                         ArtifactStore(get_settings().artifacts_dir))
    return job_id


class MalformedMessage(ValueError):
    pass


@app.task(name=TASK_NAME, bind=True, typing=False)
def run_job_task(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Message: ``args=[job_id, spec_dict, attempt]``. Arguments are checked here rather than
    by Celery so that a bad message is rejected with a clear log line."""
    try:
        job_id, spec_values, attempt = parse_message(args, kwargs)
    except MalformedMessage as exc:
        # Logged once here and acked: a Reject would add Celery's traceback of this frame.
        log.error("rejected malformed message %s: %s", self.request.id, exc)
        return {"rejected": str(exc)}
    return execute(job_id, spec_values, attempt, hostname=self.request.hostname or "worker")


def parse_message(args: tuple, kwargs: dict) -> tuple[str, dict[str, Any], int]:
    names = ("job_id", "spec", "attempt")
    if len(args) > len(names) or set(kwargs) - set(names):
        raise MalformedMessage(f"expected (job_id, spec, attempt), got {len(args)} "
                               f"arguments and keywords {sorted(kwargs)}")
    values = dict(zip(names, args, strict=False)) | kwargs
    values.setdefault("attempt", 1)
    if "job_id" not in values or "spec" not in values:
        raise MalformedMessage("job_id and spec are required")
    try:
        job_id = validate_job_id(values["job_id"])
    except InvalidJobId as exc:
        raise MalformedMessage(str(exc)) from None
    if not isinstance(values["spec"], dict):
        raise MalformedMessage("spec must be a JSON object")
    attempt = values["attempt"]
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise MalformedMessage(f"attempt must be a positive integer, got {attempt!r}")
    return job_id, values["spec"], attempt


def execute(job_id: str, spec_values: dict[str, Any], attempt: int, *,
            hostname: str) -> dict[str, Any]:
    settings = get_settings()
    records = worker_records()
    store = ArtifactStore(settings.artifacts_dir)
    owner = f"{hostname}:{os.getpid()}:{attempt}"
    if shutting_down():
        return _put_back(records, job_id, spec_values, attempt)
    try:
        claimed = lifecycle.claim(records, store, job_id, attempt, owner,
                                  lease_seconds=settings.heartbeat_timeout_seconds,
                                  worker=hostname)
    except redis.RedisError as exc:
        # Never ack a message we could not claim: back to the queue (or, if Redis is
        # still gone, left unacked for kombu to restore).
        raise Reject(f"Redis unavailable: {exc}", requeue=True) from None
    if claimed is not Claim.CLAIMED:
        # Every other outcome is settled by the claim itself (Claim says which): acking the
        # message is all that is left to do.
        log.info("job %s attempt %d not run: %s", job_id, attempt, claimed)
        return {"job_id": job_id, "attempt": attempt, "skipped": str(claimed)}
    log.info("job %s attempt %d claimed by %s", job_id, attempt, hostname)

    try:
        spec = build_spec(spec_values)
        if spec.dataset in FILE_DATASETS and not settings.data_dir:
            raise SpecError("data_root", "this worker has no LABCTL_DATA_DIR, so it reads no "
                            "dataset files")
        check_capacity(spec, hostname)
    except SpecError as exc:
        error = f"invalid spec: {exc}"
        _fail_before_running(records, job_id, owner, attempt, error)
        return {"job_id": job_id, "attempt": attempt, "state": JobState.FAILED}
    if missing := missing_checkpoint(records.get(job_id) or {}, store, job_id, spec):
        _fail_before_running(records, job_id, owner, attempt, missing)
        return {"job_id": job_id, "attempt": attempt, "state": JobState.FAILED}

    return _run_claimed(records, store, spec, job_id, attempt, owner, hostname)


def _put_back(records: JobRecords, job_id: str, spec_values: dict[str, Any],
              attempt: int) -> dict[str, Any]:
    """A worker that is stopping can still be handed a message: one it was already reading
    when the signal came, often the very job another worker just handed back. Claiming it
    would only hand it back again, one attempt later; the message goes back as it came, for
    a worker that stays."""
    from labctl.shared.queue import enqueue

    try:
        record = records.get(job_id)
        waiting = (record is not None and record.get("state") == JobState.QUEUED
                   and record.get("attempts") == attempt)
        if waiting:
            enqueue(job_id, spec_values, attempt=attempt, queue=record["queue"], app=app)
    except Exception as exc:  # not sent: the broker keeps this message instead
        raise Reject(f"worker shutting down; message not re-sent: {exc}", requeue=True) from None
    log.info("job %s attempt %d not claimed: this worker is shutting down%s", job_id, attempt,
             "; put back in the queue" if waiting else " (and the job waits for no message)")
    return {"job_id": job_id, "attempt": attempt, "skipped": "worker shutting down"}


def _fail_before_running(records: JobRecords, job_id: str, owner: str, attempt: int,
                         error: str) -> None:
    # The line before the end: a follower stops reading the log once the state is final.
    records.append_log(job_id, f"failed: {error}")
    lifecycle.ended(records, job_id, owner, JobState.FAILED, error=error)
    # The user's mistake, not the worker's: one line, no traceback, the message acked.
    log.warning("job %s attempt %d failed: %s", job_id, attempt, error)


def check_capacity(spec: JobSpec, hostname: str) -> None:
    """A job asking for more ranks than this worker has devices fails with the reason,
    rather than waiting for GPUs that will never appear. Raises :class:`SpecError`."""
    count, kind = usable_devices(spec.device, worker_capacity())
    if count is not None and spec.devices > count:
        raise SpecError("devices", f"{spec.devices} requested but worker {hostname} has "
                        f"{count} {kind}"
                        + (" (labctl worker --gpus 0,1,... gives it more)"
                           if kind == "GPUs" else ""))


def missing_checkpoint(record: dict[str, Any], store: ArtifactStore, job_id: str,
                       spec: JobSpec) -> str | None:
    """Why a resumed job cannot go on here, or None. Its record says epochs were
    checkpointed (an earlier attempt, maybe on another host, wrote them), but this worker's
    artefact folder has no checkpoint: the folder is not the one that attempt wrote, and
    training from epoch 1 would silently throw its epochs away."""
    done = record.get("epoch") or 0
    if not done or checkpoint_path(store.job(job_id).path, spec.model).exists():
        return None
    return (f"the artefacts directory is not shared between workers: the job's record says "
            f"{done} epoch(s) were checkpointed, but {store.job(job_id).path} has no "
            f"checkpoint here; mount the same LABCTL_ARTIFACTS_DIR (NFS or similar) on "
            f"every worker")


def _run_claimed(records: JobRecords, store: ArtifactStore, spec: JobSpec, job_id: str,
                 attempt: int, owner: str, hostname: str) -> dict[str, Any]:
    settings = get_settings()
    heartbeat = Heartbeat(records, job_id, owner, interval=settings.heartbeat_seconds,
                          lease_seconds=settings.heartbeat_timeout_seconds,
                          folder=store.job(job_id))
    reporter = Reporters(QueueReporter(records, job_id, owner, heartbeat),
                         *extra_reporters(spec, job_id))
    record = records.get(job_id) or {}
    status_extra = {"worker": hostname, "attempts": attempt, "queue": record.get("queue"),
                    "sweep_id": spec.sweep_id}
    global _running_job  # noqa: PLW0603 - the process's one running job, for terminate
    heartbeat.start()
    _running_job = job_id
    try:
        outcome = run_job(spec, job_id, store, reporter, default_data_root=settings.data_dir,
                          allowed_data_dir=settings.data_dir, status_extra=status_extra,
                          writer=f"worker {hostname}", on_rank_lost=_hand_back_rank_lost)
    except JobReleased as released:
        reporter.close()  # on_end never ran: drop the job's live metric series here
        # Before the hand-back: a beat after it would find the lease gone and log it as lost.
        _stop_beating(heartbeat)
        return _released(records, store, job_id, attempt, owner, released)
    finally:
        _running_job = None
        _stop_beating(heartbeat)
    # A job that failed is the job's news, not the worker's: a warning, never a traceback.
    log.log(logging.WARNING if outcome.state == JobState.FAILED else logging.INFO,
            "job %s attempt %d %s%s", job_id, attempt, outcome.state,
            f": {outcome.error}" if outcome.error else "")
    return {"job_id": job_id, "attempt": attempt, "state": outcome.state}


def _stop_beating(heartbeat: Heartbeat) -> None:
    heartbeat.stop()  # idempotent: sets an event
    heartbeat.join(timeout=5)


def _hand_back_rank_lost(lost: RankLost) -> None:
    """A killed rank (OOM killer, GPU fault) goes back to the queue and resumes from its
    last checkpoint, like a job whose worker was lost, and counts as such a loss: a job
    whose rank is killed every time fails after MAX_WORKER_LOSSES instead of looping."""
    raise JobReleased(str(lost), lost=False, counts_as_loss=True)


def _released(records: JobRecords, store: ArtifactStore, job_id: str, attempt: int,
              owner: str, released: JobReleased) -> dict[str, Any]:
    if released.lost:
        log.warning("job %s attempt %d abandoned: %s", job_id, attempt, released.reason)
        return {"job_id": job_id, "attempt": attempt, "state": "abandoned"}
    back = lifecycle.hand_back(records, store, job_id, owner,
                               loss=released.reason if released.counts_as_loss else None)
    if back.outcome == "requeued":
        send_job(app, records, job_id, back.attempt)
        log.warning("job %s handed back (%s); requeued as attempt %d",
                    job_id, released.reason, back.attempt)
    elif back.outcome == "failed":
        log.warning("job %s attempt %d failed: %s", job_id, attempt,
                    (records.get(job_id) or {}).get("error"))
    return {"job_id": job_id, "attempt": attempt, "state": back.outcome}


def extra_reporters(spec: JobSpec, job_id: str) -> list[Reporter]:
    """The one place optional reporters join a job: Prometheus metrics when installed.

    Guarded, so a bug in a metrics exporter is logged and never fails a training job."""
    try:
        from labctl.worker.metrics_reporter import MetricsReporter

        return [GuardedReporter(MetricsReporter(spec, job_id))]
    except Exception:
        log.exception("metrics reporter unavailable for job %s", job_id)
        return []
