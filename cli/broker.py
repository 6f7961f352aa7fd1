"""The CLI's connection to Redis, and the errors every queue command shares.

An unreachable broker is one line naming ``host:port`` (never the password) and exit 69,
within about a second: the CLI uses short socket timeouts and no retry loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from labctl.cli.errors import EXIT_USAGE, BadSpec, BrokerUnavailable, LabctlError, NotFound
from labctl.shared.artifacts import ArtifactStore, InvalidJobId, JobFolder, validate_job_id
from labctl.shared.records import JobRecords, connect
from labctl.shared.redis_tls import tls_failure, tls_mismatch_hint
from labctl.shared.settings import get_settings, redact_url, url_host

#: Seconds the CLI waits for Redis before saying it is unreachable.
CLI_TIMEOUT = 2.0


class BadJobId(LabctlError):
    exit_code = EXIT_USAGE


def checked_job_id(job_id: str) -> str:
    """Exit 2 for anything that is not a job id (``../etc``, spaces...), before any I/O."""
    try:
        return validate_job_id(job_id)
    except InvalidJobId as exc:
        raise BadJobId(str(exc)) from None


class BrokerRefused(BrokerUnavailable):
    """Redis answered but will not take us: its TLS certificate or our credentials were
    refused. Unlike an unreachable Redis, waiting does not help (``labctl worker`` exits)."""


def unavailable(exc: BaseException) -> BrokerUnavailable:
    url = get_settings().redis_url
    reason = str(exc).replace(url, redact_url(url)).splitlines()[0] if str(exc) else ""
    tls = tls_failure(exc)
    if tls is not None:
        return BrokerRefused(f"Redis at {url_host(url)} {tls}")
    if isinstance(exc, redis.AuthenticationError) or "auth" in reason.lower():
        return BrokerRefused(f"Redis at {url_host(url)} refused the credentials in "
                             "LABCTL_REDIS_URL")
    hint = tls_mismatch_hint(exc, url)
    if hint is not None:
        return BrokerUnavailable(f"Redis at {url_host(url)} {hint}")
    detail = f" ({reason})" if reason and url_host(url) not in reason else ""
    return BrokerUnavailable(f"Redis at {url_host(url)} is unreachable{detail}; is "
                             "redis-server running and LABCTL_REDIS_URL right?")


@contextmanager
def broker_errors() -> Iterator[None]:
    """Turn any Redis / kombu failure inside the block into one line: exit 69 when Redis
    cannot be reached or refuses us, exit 1 for anything else it answers."""
    try:
        yield
    except redis.ResponseError as exc:
        if any(code in str(exc) for code in ("NOAUTH", "WRONGPASS", "LOADING")):
            raise unavailable(exc) from None
        if "DB index is out of range" in str(exc):  # the /N of the URL: a setting, exit 2
            raise BadSpec("LABCTL_REDIS_URL: its database number is out of range for this "
                          "Redis (databases 0-15 by default)") from None
        raise LabctlError(f"Redis error: {exc}") from None
    except (redis.RedisError, OSError) as exc:  # connection, timeout, auth, protocol
        raise unavailable(exc) from None


def open_records() -> JobRecords:
    """Records on ``LABCTL_REDIS_URL``, checked with a ping so the error comes first."""
    try:
        client = connect(get_settings().redis_url, timeout=CLI_TIMEOUT, retries=0)
        with broker_errors():
            client.ping()
    except ValueError:  # unparsable URL; it may hold a password, so it is not echoed
        raise BadSpec("LABCTL_REDIS_URL is not a valid redis:// URL") from None
    return JobRecords(client)


def get_record(records: JobRecords, job_id: str) -> dict[str, Any]:
    with broker_errors():
        record = records.get(job_id)
    if record is None:
        raise NotFound(f"no job {job_id}")
    return record


def submit_or_exit(spec, records: JobRecords, job_id: str | None = None) -> str:
    """Queue ``spec`` (as ``job_id`` if given) and return its job id; an unreachable broker
    exits 69, a job no live worker has the devices for exits 2, any other refusal exits 1,
    each with one line."""
    from kombu.exceptions import OperationalError

    from labctl.shared.queue import SubmitError, capacity_problem, route_for, submit_job

    try:
        with broker_errors():
            if spec.devices > 1 and (problem := capacity_problem(
                    spec, route_for(spec), records.live_workers())):
                raise BadSpec(problem)
            return submit_job(spec, records=records, job_id=job_id)
    except SubmitError as exc:
        if isinstance(exc.__cause__, OperationalError | redis.ConnectionError | OSError):
            raise unavailable(exc.__cause__) from None
        raise LabctlError(str(exc)) from None


def find_job(job_id: str) -> tuple[JobRecords | None, JobFolder | None]:
    """Where to read a job: ``(records, None)`` when Redis has its record, else ``(None,
    folder)`` when its folder is on this host (a ``labctl run`` job, or Redis unreachable).
    Raises :class:`NotFound` when neither has it. Shared by ``status`` and ``logs``."""
    records = open_records_unless_local(job_id)
    if records is not None:
        with broker_errors():
            if records.state(job_id) is not None:
                return records, None
    folder = ArtifactStore(get_settings().artifacts_dir).job(job_id)
    if not folder.exists():
        raise NotFound(f"no job {job_id}")
    return None, folder


def open_records_unless_local(job_id: str) -> JobRecords | None:
    """Records, or ``None`` when Redis is unreachable but the job's folder is on this host
    (a `labctl run` job needs no Redis to be inspected). Otherwise exit 69 as usual."""
    try:
        return open_records()
    except BrokerUnavailable:
        if ArtifactStore(get_settings().artifacts_dir).job(job_id).exists():
            return None
        raise
