"""Submitting jobs: routing, the job record and the Celery message, in one place shared by
``labctl submit``, ``labctl sweep`` and the reaper.

Celery is imported only when a message is sent; reading records needs Redis alone. Nothing
here imports the worker: the task is sent by name (``labctl.shared.celery_config``).
"""

from __future__ import annotations

from typing import Any

from labctl.shared import lifecycle
from labctl.shared.artifacts import new_job_id, validate_job_id
from labctl.shared.records import JobRecords, connect
from labctl.shared.settings import get_settings
from labctl.shared.spec import JobSpec


class SubmitError(RuntimeError):
    """The record was written but the message could not be sent; the record says failed."""


def route_for(spec: JobSpec) -> str:
    """``cpu`` or ``gpu``: the NumPy CNN never uses a GPU; ResNet50 does unless told not to."""
    if spec.model == "numpy-cnn" or spec.device == "cpu":
        return "cpu"
    return "gpu"


def usable_devices(device: str, capacity: dict[str, Any]) -> tuple[int | None, str]:
    """How many ranks a worker of ``capacity`` (its announced ``gpus`` and ``cpus``) can
    give a job on ``device``, and what they are: GPUs for cuda, CPU processes for cpu, and
    for auto whichever the job would get there (its GPUs if it has any). None: unknown
    (a worker that announced no capacity)."""
    gpus, cpus = capacity.get("gpus"), capacity.get("cpus")
    if device == "cpu" or (device == "auto" and gpus == 0):
        return (cpus if isinstance(cpus, int) else None), "CPUs"
    return (gpus if isinstance(gpus, int) else None), "GPUs"


def capacity_problem(spec: JobSpec, queue: str, workers: list[dict[str, Any]]) -> str | None:
    """Why no live worker of ``queue`` could run ``spec``, or None. Only judged when every
    worker of the queue announced its capacity: an unknown or absent worker may still fit
    (the worker then checks when the job arrives)."""
    if spec.devices <= 1:
        return None
    listening = [w for w in workers if queue in w.get("queues", ())]
    usable = [usable_devices(spec.device, w) for w in listening]
    if not usable or any(count is None for count, _ in usable):
        return None
    most, kind = max(usable, key=lambda pair: pair[0])
    if spec.devices <= most:
        return None
    return (f"devices: {spec.devices} requested, but the live workers of the {queue} queue "
            f"have at most {most} {kind} each (a job runs on one worker)")


def submit_job(spec: JobSpec, *, records: JobRecords | None = None, app: Any = None,
               queue: str | None = None, job_id: str | None = None) -> str:
    """Queue ``spec`` and return its job id.

    Writes the job record (state queued, attempt 1) before sending the message, so a worker
    never receives a job it has no record of. ``records`` / ``app`` default to clients built
    from ``LABCTL_REDIS_URL``. Raises ``redis.RedisError`` if Redis is unreachable and
    :class:`SubmitError` if the message could not be sent.

    The spec travels as given: a ``data_root`` left ``None`` is filled in by the worker from
    its own ``LABCTL_DATA_DIR``, since the data lives where the job runs.
    """
    records = records or JobRecords(connect(get_settings().redis_url))
    job_id = validate_job_id(job_id) if job_id else new_job_id()
    queue = queue or route_for(spec)
    lifecycle.queued(records, job_id, spec, queue)
    try:
        enqueue(job_id, spec.model_dump(mode="json"), attempt=1, queue=queue, app=app)
    except Exception as exc:
        lifecycle.unsent(records, job_id, f"could not be queued: {type(exc).__name__}: {exc}")
        raise SubmitError(f"job {job_id} could not be queued: {exc}") from exc
    return job_id


_apps: dict[tuple[str | None, ...], Any] = {}


def celery_app() -> Any:
    """An app that sends to the current ``LABCTL_REDIS_URL``, one per URL and TLS settings
    (tests, or a program talking to several stacks, change them)."""
    from labctl.shared.celery_config import sender_app

    settings = get_settings()
    key = (settings.redis_url, settings.redis_tls_ca, settings.redis_tls_cert,
           settings.redis_tls_key)
    if key not in _apps:
        _apps[key] = sender_app(settings.redis_url)
    return _apps[key]


def enqueue(job_id: str, spec: dict[str, Any], *, attempt: int, queue: str,
            app: Any = None) -> None:
    """Send the Celery message for ``attempt`` of a job whose record is already queued."""
    from labctl.shared.celery_config import PRIORITIES, TASK_NAME

    app = app or celery_app()
    app.send_task(TASK_NAME, args=[job_id, spec, attempt], queue=queue,
                  task_id=f"{job_id}.{attempt}",
                  priority=PRIORITIES[spec.get("priority") or "normal"])
